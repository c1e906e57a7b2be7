"""The hidden maps of the MLP memories: an activation, optionally followed by an L2 norm, with
their first and second derivatives written out (the closed-form inner gradients of
:mod:`nldsl.runtime.deep_memory` and the hand-written backward of :mod:`nldsl.runtime._mlp_write`).

Names: ``act`` is an activation (:data:`ACTIVATIONS`), or one with the :data:`L2` suffix, whose
output ``u = act(h)`` is divided by ``r = sqrt(||u||^2 + 1e-12)``. Tensors ``[..., width]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "L2",
    "activation",
    "activation_grad",
    "activation_grad2",
    "hidden_act",
    "hidden",
    "split_hidden",
    "hidden_backward",
]

ACTIVATIONS = ("gelu", "silu", "relu", "tanh", "identity")
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation(x: Tensor, name: str) -> Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


def activation_grad(x: Tensor, name: str) -> Tensor:
    """d act / dx, written out so that it is itself differentiable (second-order outer grads)."""
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(x * _SQRT1_2)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if name == "relu":
        return (x > 0).to(x.dtype)
    if name == "tanh":
        return 1.0 - torch.tanh(x) ** 2
    if name == "identity":
        return torch.ones_like(x)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")


#: suffix of an activation name that L2-normalises the hidden activations (``hidden_norm="l2"``)
L2 = "+l2"
_NORM_EPS2 = 1e-12


def hidden_act(hidden_norm: str, name: str) -> str:
    """The internal name of a hidden map: the activation, L2-normalised with ``hidden_norm="l2"``."""
    if hidden_norm not in ("none", "l2"):
        raise ValueError(f"hidden_norm must be 'none' or 'l2', got {hidden_norm!r}")
    return name + L2 if hidden_norm == "l2" else name


def split_hidden(act: str) -> tuple[str, bool]:
    """A hidden map's name as ``(activation, L2-normalised)``."""
    return (act[:-len(L2)], True) if act.endswith(L2) else (act, False)


def hidden(h: Tensor, act: str) -> Tensor:
    """A hidden layer's output from its pre-activation: ``act(h)``, or ``act(h) / ||act(h)||``
    (a smooth norm, ``sqrt(||u||^2 + 1e-12)``) when ``act`` ends in ``+l2``."""
    base, l2 = split_hidden(act)
    u = activation(h, base)
    if not l2:
        return u
    return u * torch.rsqrt((u * u).sum(-1, keepdim=True) + _NORM_EPS2)


def hidden_backward(d: Tensor, h: Tensor, act: str) -> Tensor:
    """dL/dh from dL/d(hidden(h)) ``d``, written out (differentiable: second-order outer grads)."""
    base, l2 = split_hidden(act)
    if not l2:
        return _times_act_grad(d, h, base)
    u = activation(h, base)
    inv_r = torch.rsqrt((u * u).sum(-1, keepdim=True) + _NORM_EPS2)
    n = u * inv_r
    return _times_act_grad((d - n * (n * d).sum(-1, keepdim=True)) * inv_r, h, base)


def _times_act_grad(d: Tensor, h: Tensor, name: str) -> Tensor:
    """``d * activation_grad(h, name)``; for gelu torch's fused ``gelu_backward`` (one op instead
    of ten, the same formula, and differentiable twice like the written-out one)."""
    if name == "gelu" and d.shape == h.shape:
        return torch.ops.aten.gelu_backward(d, h)
    return d * activation_grad(h, name)


def activation_grad2(x: Tensor, name: str) -> Tensor:
    """d^2 act / dx^2 (the hand-written backward of a write differentiates the inner gradient)."""
    if name == "gelu":  # gelu' = Phi(x) + x phi(x), gelu'' = phi(x) (2 - x^2)
        return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI * (2.0 - x * x)
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))
    if name == "relu" or name == "identity":
        return torch.zeros_like(x)
    if name == "tanh":
        t = torch.tanh(x)
        return -2.0 * t * (1.0 - t * t)
    raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}")
