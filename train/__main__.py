"""`python -m verikit.train ...` and `torchrun --nproc-per-node K -m verikit.train ...`: the
`verikit train` command (data parallel when torchrun started the process)."""
import sys

from verikit.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["train"]
    main(prog_name="verikit")
