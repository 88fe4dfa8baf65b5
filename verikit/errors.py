"""User-facing errors. The CLI turns every `VerikitError` into a one-line message and exit code 2."""
from __future__ import annotations


class VerikitError(Exception):
    """Bad input or an impossible request: reported to the user, never as a traceback."""


class ModelLoadError(VerikitError):
    """A model file is missing, unreadable or not a valid ONNX model."""


class UnsupportedOpsError(VerikitError):
    """The model contains operators verikit cannot represent exactly.

    `nodes` is a list of (node name, op type, reason) for *every* unsupported node, so the user
    sees the whole list at once instead of fixing them one by one.
    """

    def __init__(self, nodes: list[tuple[str, str, str]]):
        self.nodes = nodes
        listing = "; ".join(f"{name or '<unnamed>'} ({op}{': ' + why if why else ''})" for name, op, why in nodes)
        count = f"{len(nodes)} node" + ("" if len(nodes) == 1 else "s")
        super().__init__(f"unsupported operators in model ({count}): {listing}")


class ShapeError(VerikitError):
    """An input does not have the shape the model expects."""


class UnknownDomainError(VerikitError):
    """A domain name is not registered."""


class SpecError(VerikitError):
    """A property / specification is malformed."""


class SolverError(VerikitError):
    """A solver is missing, refused the model (licence) or failed."""
