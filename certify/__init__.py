"""verikit.certify: prove or refute robustness of ONNX networks.

    from verikit.certify import Chain, ChainConfig, load_model
    model = load_model("model.onnx")
    outcomes = Chain(model.graph, ChainConfig(domains=["box", "crown"], onnx_path=model.path)).run(box, spec)

The command line (`verikit certify`, `verikit vnncomp`) lives in `verikit.certify.cli`.
"""
from .attack import AttackResult, pgd_attack  # noqa: F401
from .chain import Chain, ChainConfig, Outcome  # noqa: F401
from .eps import parse_eps_list, parse_eps_value  # noqa: F401
from .model import LoadedModel, load_model  # noqa: F401
from .vnnlib import VnnlibCase, VnnlibProperty, load_vnnlib, parse_vnnlib  # noqa: F401
