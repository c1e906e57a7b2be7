"""nldsl: a compiler for nested systems of associative memories (Nested Learning, NeurIPS 2025).

``import nldsl`` is light: it does not import torch. The front half (``load``, ``check``) works
without it.
"""
from nldsl.diagnostics import Diagnostic, SpecError
from nldsl.spec import Spec, check, load, loads

__version__ = "0.1.0"
__all__ = ["Diagnostic", "Spec", "SpecError", "check", "load", "loads", "__version__"]
