"""MLP memories of compiled optimizers: deep momentum (Nested Learning, section 4.4, Eq. 50).

Eq. 50 replaces the momentum's linear memory with an MLP ``m(.)`` trained in context on the
gradient stream::

    W_{i+1} = W_i + m_{i+1}(u_i),   m_{i+1} = alpha m_i - eta grad L2(m_i; u_i, 1),   u_i = grad L(W_i)

The paper leaves the MLP's shape open. Here it is *coordinate-wise*: every coordinate of a
parameter has its own small MLP from a number to a number, so the memory generalises the
elementwise momentum memory (whose state is one number per coordinate: the depth-1 case
``m(x) = a x``) and treats parameters of every rank alike. A ``depth``-layer MLP with hidden
width ``hidden`` and no biases (as the paper's memories, Eq. 89) computes::

    f(x) = W_depth s( ... s(W_2 s(W_1 x)) ... ),   m(x) = x + f(x) with `residual`, else f(x)

with ``W_1`` of shape ``hidden x 1``, ``W_depth`` of shape ``1 x hidden`` and the layers in
between ``hidden x hidden`` (``depth = 1``: one ``1 x 1`` weight). Its state, for a memory
``name`` and a parameter of shape ``S``, is ``depth`` tensors ``name.layers.{i}`` of shape
``S + (out, in)`` in the order they are applied.

One write is one gradient step on the memory's objective at its key ``k`` and value ``v``,
summed over coordinates (each coordinate's loss depends on its own weights only, so this is
each coordinate's own step), with retention ``alpha`` on every weight::

    theta <- alpha theta - lr dL/dtheta,   L = sum_j obj(m_j(k_j), v_j)

``dot`` is ``-m(k) v``; ``l2``, ``l1``, ``lp``, ``huber`` compare ``m(k) - v`` as for the
other memories. The gradient is taken by autograd through the forward pass, a chunk of
``CHUNK`` coordinates at a time so that the hidden activations stay small.

The initial state (``init zeros``) makes the learned part ``f`` output zero: the last layer is
zero, so the memory starts as the identity with ``residual`` and as zero without. The other
layers cannot start at zero too (every gradient would stay zero), so ``W_1`` is a fixed fan
of slopes ``+-1/n, +-2/n, ..., +-1`` (``n = ceil(hidden / 2)``) and the middle layers are the
identity: the same deterministic start for every coordinate, no random numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from nldsl.optim.tensorlist import TensorList, as_tensor_list, is_number
from nldsl.runtime._common import OBJECTIVES, objective_gradient

CHUNK = 1 << 16  # coordinates per pass: a pass's hidden activations stay in cache

ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "identity": lambda z: z,
}


@dataclass(frozen=True)
class CoordinateMLP:
    """The structure of an ``mlp`` optimizer memory: one small MLP per coordinate."""

    depth: int
    hidden: int
    residual: bool
    activation: str

    def __post_init__(self):
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"an MLP memory needs depth >= 1, got {self.depth!r}")
        if not (isinstance(self.hidden, int) and self.hidden >= 1):
            raise ValueError(f"an MLP memory needs a whole hidden width >= 1, got {self.hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")

    # ---- layout ----
    def shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of each layer, in the order they are applied."""
        widths = [1] + [self.hidden] * (self.depth - 1) + [1]
        return [(widths[i + 1], widths[i]) for i in range(self.depth)]

    @staticmethod
    def state_key(name: str, layer: int) -> str:
        return f"{name}.layers.{layer}"

    def keys(self, name: str) -> list[str]:
        return [self.state_key(name, i) for i in range(self.depth)]

    def initial_state(self, name: str, p: Tensor) -> dict[str, Tensor]:
        """The state of memory ``name`` for parameter ``p`` before its first write."""
        out = {}
        last = self.depth - 1
        for i, (rows, cols) in enumerate(self.shapes()):
            if i == last:
                w = torch.zeros(rows, cols, dtype=p.dtype, device=p.device)
            elif i == 0:
                n = math.ceil(rows / 2)
                fan = [(-1) ** j * (j // 2 + 1) / n for j in range(rows)]
                w = torch.tensor(fan, dtype=p.dtype, device=p.device).reshape(rows, 1)
            else:
                w = torch.eye(rows, dtype=p.dtype, device=p.device)
            out[self.state_key(name, i)] = w.expand(*p.shape, rows, cols).clone()
        return out

    # ---- the map ----
    def forward(self, weights: Sequence[Tensor], x: Tensor) -> Tensor:
        """``m(x)`` coordinate by coordinate: ``x`` has the parameter's shape."""
        act = ACTIVATIONS[self.activation]
        a = x.unsqueeze(-1)  # (*S, 1): each coordinate's input vector
        for i, w in enumerate(weights):
            if w.shape[-1] == 1:  # one input: a product, no sum
                a = w.squeeze(-1) * a
            else:  # (*S, out, in) @ (*S, in): a batch of tiny mat-vecs
                a = (w * a.unsqueeze(-2)).sum(-1)
            if i < len(weights) - 1:
                a = act(a)
        y = a.squeeze(-1)
        return x + y if self.residual else y

    def _flat_weights(self, state: dict, name: str) -> list[Tensor]:
        """Each layer's weights as a ``(coordinates, out, in)`` view of the state."""
        out = []
        for k in self.keys(name):
            w = state[k]
            if not w.is_contiguous():  # a view must write through to the state
                w = state[k] = w.contiguous()
            out.append(w.view(-1, *w.shape[-2:]))
        return out

    def _like(self, states: Sequence[dict], name: str) -> TensorList:
        """Tensors shaped like the parameters (to broadcast numbers to)."""
        return TensorList([s[self.state_key(name, 0)][..., 0, 0] for s in states])

    def read(self, states: Sequence[dict], name: str, query) -> TensorList:
        """``m(query)`` for every parameter of ``states`` (the state as it is now)."""
        if not states:
            return TensorList([])
        out = []
        for s, q in zip(states, as_tensor_list(query, self._like(states, name)).values()):
            weights, flat = self._flat_weights(s, name), q.reshape(-1)
            y = torch.empty_like(flat)
            for lo in range(0, flat.numel(), CHUNK):
                part = slice(lo, lo + CHUNK)
                y[part] = self.forward([w[part] for w in weights], flat[part])
            out.append(y.view(q.shape))
        return TensorList(out, owned=True)

    def write(self, states: Sequence[dict], name: str, value, *, key, objective: str = "dot",
              lr: float = 1.0, retention: float = 1.0, p: float | None = None,
              delta: float | None = None) -> None:
        """One write: a gradient step on ``obj(m(key), value)`` with retention on every weight."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}")
        if not (is_number(lr) and is_number(retention)):
            raise TypeError("an MLP memory's lr and retention are numbers")
        if not states:
            return
        like = self._like(states, name)
        keys = as_tensor_list(key, like).values()
        values = as_tensor_list(value, like).values()
        for s, k, v in zip(states, keys, values):
            weights, k, v = self._flat_weights(s, name), k.reshape(-1), v.reshape(-1)
            for lo in range(0, k.numel(), CHUNK):
                part = slice(lo, lo + CHUNK)
                chunk = [w[part] for w in weights]
                with torch.enable_grad():
                    leaves = [w.detach().requires_grad_(True) for w in chunk]
                    y = self.forward(leaves, k[part].detach())
                    if objective == "dot":
                        dloss = -v[part]
                    else:
                        dloss = objective_gradient(objective, y.detach() - v[part], p=p, delta=delta)
                    grads = torch.autograd.grad(y, leaves, grad_outputs=dloss.to(y.dtype), allow_unused=True)
                for w, g in zip(chunk, grads):  # views: the state changes in place
                    if retention != 1:
                        w.mul_(retention)
                    if g is not None:
                        w.sub_(g, alpha=lr)


__all__ = ["ACTIVATIONS", "CoordinateMLP"]
