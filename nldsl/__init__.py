"""nldsl: a compiler for nested systems of associative memories (Nested Learning, NeurIPS 2025).

``import nldsl`` is light: it does not import torch. The front half (``load``, ``check``) works
without it.
"""
from nldsl.diagnostics import Diagnostic, SpecError
from nldsl.spec import Spec, check, load, loads

__version__ = "0.1.0"
__all__ = ["Diagnostic", "Spec", "SpecError", "check", "compile", "load", "loads", "__version__"]


def compile(path):  # noqa: A001 - the contract's name: nldsl.compile("specs/hope.nl")
    """Generates the spec's PyTorch module, imports it and returns it.

    One class per model block (an :class:`nldsl.nn.model.NSAMModel`) and per optimizer block
    (a ``torch.optim.Optimizer``). Raises :class:`SpecError` for a spec with errors, or one
    the compiler cannot build (code NL401). Imports torch.
    """
    from nldsl.codegen import compile_spec

    return compile_spec(path)
