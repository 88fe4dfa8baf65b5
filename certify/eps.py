"""The `--eps` parser lives in the core (`verikit.eps`) so that `certify` and `train` share it."""
from verikit.eps import format_eps, parse_eps_list, parse_eps_value  # noqa: F401
