"""Running verikit's CLI from tests: in-process through click, or as the installed console script."""
import os
import shutil
import sys

import torch
from click.testing import CliRunner

from verikit.cli import main


def invoke(*args):
    """`verikit ARGS` in this process; the command sets torch's thread count, so restore it after."""
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def console_script():
    """The installed `verikit` executable next to this interpreter (or on PATH), else None."""
    exe = os.path.join(os.path.dirname(sys.executable), "verikit")
    return exe if os.path.exists(exe) else shutil.which("verikit")
