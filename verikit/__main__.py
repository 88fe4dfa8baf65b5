"""`python -m verikit ...`: the same command line as the `verikit` script."""
from verikit.cli import main

if __name__ == "__main__":
    main(prog_name="verikit")
