"""verikit: neural-network verification and certified training.

Public API (see README):

    import verikit
    graph = verikit.from_onnx("model.onnx")            # or verikit.from_torch(module, (1, 28, 28))
    box = verikit.Box.linf_ball(x, eps=0.1)            # L-inf ball ∩ [0, 1]
    spec = verikit.Spec.robustness(labels, 10)         # margins y_true - y_j
    result = verikit.get_domain("box").bound(graph, box, spec)
    result.verified(spec)                              # per-sample booleans
"""
from .bounds import Box, BoundStore  # noqa: F401
from .errors import (  # noqa: F401
    ModelLoadError, ShapeError, SolverError, SpecError, UnknownDomainError, UnsupportedOpsError, VerikitError,
)
from .ir import EvalContext, Graph  # noqa: F401
from .onnx_import import from_onnx  # noqa: F401
from .spec import Spec, fold_spec  # noqa: F401
from .torch_import import from_torch  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # the domain API lives in verikit.domains (which imports the core); expose it lazily
    if name in ("Domain", "DomainResult", "register_domain", "get_domain", "available_domains"):
        from . import domains as _d  # noqa: F401
        import verikit.domains as d

        return getattr(d, name)
    raise AttributeError(name)
