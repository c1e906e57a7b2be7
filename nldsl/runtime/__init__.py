"""nldsl.runtime: hand-written, tested in-context memory ops that generated code wires together.

Every op follows flash-linear-attention's conventions so the two can be swapped:

* ``q, k``: ``[B, T, H, K]``, ``v``: ``[B, T, H, V]``, per-token gates ``[B, T, H]``;
* ``scale`` (default ``K ** -0.5``), ``initial_state``, ``output_final_state``;
* the state of one head is a ``[K, V]`` matrix ``S`` (the paper's memory ``M`` transposed), read
  as ``o_t = scale * S_t^T q_t`` after token t's own write (unless an op's ``read=`` says
  otherwise);
* every op returns ``MemoryOutput(o, final_state)``; passing ``final_state`` back as
  ``initial_state`` continues the stream exactly, wherever the split falls;
* ``impl=`` picks the implementation, with no silent fallback: ``"reference"`` (token by token,
  the readable ground truth) and ``"chunked"`` (chunkwise-parallel, the default) for the linear
  memories, ``"reference"`` and ``"sdpa"`` for softmax attention, and ``"triton"`` (kernels
  generated from ``codegen_templates/kernels/``, see :mod:`nldsl.codegen.kernels`) for
  :func:`linear_attention`, :func:`delta_rule`, :func:`gated_delta_rule` and :func:`dgd`.
  ``"triton"`` runs on CUDA tensors, or on CPU under ``TRITON_INTERPRET=1`` (Triton's
  interpreter: slow, for tests); anything an op does not implement raises ValueError naming
  the valid choices, and a missing triton or GPU raises RuntimeError.
* recurrent states are kept in float32 for lower-precision inputs (float64 stays float64).

Ops (module docstrings carry the equations, sign conventions and paper references):

==========================  ======================================================================
:func:`linear_attention`    Hebbian / dot-product memory, optional constant or gated decay (Eq. 64)
:func:`delta_rule`          L2 objective, one GD step per token (DeltaNet, Eq. 65)
:func:`gated_delta_rule`    delta rule with a log-space retention gate (Gated DeltaNet)
:func:`titans_linear`       momentum + forget gate, gradients at the chunk anchor (Titans Eq. 13-18);
                            l2, dot and the robust objectives (l1, lp, huber; section 5)
:func:`dgd`                 Delta Gradient Descent with retention, chunk anchor (NL Eq. 57, 88, 93);
                            l2 or dot
:func:`omega_rule`          sliding-window gradient (NL Eq. 68 / Atlas' Omega rule); l2 or dot
:func:`softmax_attention`   non-parametric memory, KV cache as state (Eq. 62-63)
==========================  ======================================================================
"""
from nldsl.runtime._common import MemoryOutput
from nldsl.runtime.attention import KVCache, softmax_attention
from nldsl.runtime.delta_rule import delta_rule, gated_delta_rule
from nldsl.runtime.dgd import DGDState, dgd
from nldsl.runtime.linear_attention import linear_attention
from nldsl.runtime.omega import OmegaState, omega_rule
from nldsl.runtime.titans import TitansState, titans_linear

#: The implementations each op accepts, the fast default first.
IMPLS = {
    "linear_attention": ("chunked", "reference", "triton"),
    "delta_rule": ("chunked", "reference", "triton"),
    "gated_delta_rule": ("chunked", "reference", "triton"),
    "titans_linear": ("chunked", "reference"),
    "dgd": ("chunked", "reference", "triton"),
    "omega_rule": ("chunked", "reference"),
    "softmax_attention": ("sdpa", "reference"),
}

__all__ = [
    "IMPLS",
    "DGDState",
    "KVCache",
    "MemoryOutput",
    "OmegaState",
    "TitansState",
    "delta_rule",
    "dgd",
    "gated_delta_rule",
    "linear_attention",
    "omega_rule",
    "softmax_attention",
    "titans_linear",
]
