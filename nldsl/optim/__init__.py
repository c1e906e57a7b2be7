"""Runtime of compiled optimizers: the hand-written, tested pieces generated code wires.

Generated optimizer modules do ``import nldsl.optim as rt`` and only call what is exported
here with the spec's names and constants; all numerics live in this package:

* :mod:`nldsl.optim.tensorlist` - foreach arithmetic over a parameter group (``TensorList``,
  per-parameter ``Scalars``, the spec's functions ``sqrt``/``abs``/``sign``/``maximum``/
  ``minimum``/``clamp``/``where``, and :func:`apply_update`);
* :mod:`nldsl.optim.memory` - memory writes (one gradient step on the memory's objective),
  bias-corrected reads, chunk sums of slow levels, amortised slow values;
* :mod:`nldsl.optim.deep` - MLP memories (deep momentum): :class:`CoordinateMLP`;
* :mod:`nldsl.optim.newton_schulz` - Muon's Newton-Schulz iteration and rank handling;
* :mod:`nldsl.optim.base` - :class:`CompiledOptimizer`, the ``torch.optim.Optimizer`` base
  class (param groups, lazily initialised state, hyperparameter checks).

Importing this package imports torch; ``import nldsl`` alone does not.
"""
from nldsl.optim.base import CompiledOptimizer, check_hyperparameters, steps
from nldsl.optim.deep import CoordinateMLP
from nldsl.optim.memory import (accumulate, boundaries, cache_key, chunk_key, full, missing, read, store,
                                subset, write, write_chunk, zeros)
from nldsl.optim.newton_schulz import matrix_shape, newton_schulz, orthogonalize, rows_cols
from nldsl.optim.tensorlist import (Scalars, TensorList, abs, apply_update, bind, clamp, maximum, minimum,
                                    sign, sqrt, where)

__all__ = [
    "CompiledOptimizer", "CoordinateMLP", "Scalars", "TensorList", "abs", "accumulate", "apply_update", "bind",
    "boundaries", "cache_key", "check_hyperparameters", "chunk_key", "clamp", "full", "matrix_shape",
    "maximum", "minimum", "missing", "newton_schulz", "orthogonalize", "read", "rows_cols", "sign",
    "sqrt", "steps", "store", "subset", "where", "write", "write_chunk", "zeros",
]
