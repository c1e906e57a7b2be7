"""The base class of compiled optimizers: parameter groups, state, hyperparameter checks.

A generated optimizer class sets three class attributes (``hyperparameters``: name ->
default, ``matrix_only``: why parameters must be matrices, or ``""``; ``spec``: where it was
defined) and writes two methods: ``_init_state`` (the memories' initial states) and ``step``
(the spec's memory writes and update). Everything else - param groups, ``state_dict`` /
``load_state_dict`` (all state lives in ``self.state``), ``zero_grad``, hooks - is
``torch.optim.Optimizer``'s.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from nldsl.optim.newton_schulz import rows_cols
from nldsl.optim.tensorlist import Scalars, is_number

# Constraints torch.optim states for these hyperparameter names (same messages), so a
# compiled optimizer refuses what its torch.optim counterpart refuses.
_NON_NEGATIVE = {
    "lr": "Invalid learning rate: {}",
    "eps": "Invalid epsilon value: {}",
    "weight_decay": "Invalid weight_decay value: {}",
    "momentum": "Invalid momentum value: {}",
    "lr_decay": "Invalid lr_decay value: {}",
    "initial_accumulator_value": "Invalid initial_accumulator_value value: {}",
    "alpha": "Invalid alpha value: {}",
}


def _check_value(owner: str, name: str, value: Any, default: Any) -> Any:
    """Checks one hyperparameter against its default's type; returns it normalised."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: `{name}` must be True or False, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple) or len(value) != len(default):
            raise TypeError(f"{owner}: `{name}` must be a tuple of {len(default)} values like "
                            f"{default!r}, got {value!r}")
        return tuple(_check_value(owner, f"{name}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default)))
    if is_number(default):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not is_number(value) or isinstance(value, bool):
            raise TypeError(f"{owner}: `{name}` must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{owner}: `{name}` must be finite, got {value!r}")
        return value
    return value


def check_hyperparameters(owner: str, values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Validates hyperparameters by their defaults' types and torch.optim's rules for known
    names; returns them normalised (lists become tuples)."""
    out = {}
    for name, value in values.items():
        out[name] = _check_value(owner, name, value, defaults.get(name))
    for name, message in _NON_NEGATIVE.items():
        v = out.get(name)
        if is_number(v) and not 0.0 <= v:
            raise ValueError(message.format(v))
    betas = out.get("betas")
    if isinstance(betas, tuple):
        for i, b in enumerate(betas):
            if is_number(b) and not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    steps = out.get("ns_steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100):
        raise ValueError(f"{owner}: `ns_steps` must be an integer in [0, 100), got {steps!r}")
    if out.get("nesterov") is True and "momentum" in out and "dampening" in out:
        if out["momentum"] <= 0 or out["dampening"] != 0:
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return out


class CompiledOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` compiled from an nldsl optimizer spec."""

    hyperparameters: ClassVar[dict[str, Any]] = {}
    matrix_only: ClassVar[str] = ""
    spec: ClassVar[str] = ""

    def __init__(self, params, defaults: dict[str, Any]):
        defaults = check_hyperparameters(type(self).__name__, defaults, self.hyperparameters)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = [k for k in self.hyperparameters if k in group]
        group.update(check_hyperparameters(type(self).__name__, {k: group[k] for k in names},
                                           self.hyperparameters))
        if self.matrix_only:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"{type(self).__name__} only supports parameters of rank >= 2 ({self.matrix_only}), "
                        f"but got a parameter of shape {tuple(p.shape)}; optimize vectors and scalars "
                        "(biases, norms, embeddings' gains) in another optimizer such as "
                        "torch.optim.AdamW, as with torch.optim.Muon")

    def _init_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _gather(self, group: dict[str, Any]):
        """The parameters of ``group`` that have a gradient, their gradients and states
        (initialised on first use), with each state's step count advanced."""
        params, grads, states = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                self._init_state(group, p, state)
            state["step"] += 1
            params.append(p)
            grads.append(p.grad)
            states.append(state)
        return params, grads, states


def steps(states) -> Scalars:
    """The ``step`` builtin: each parameter's step number (1 on its first step)."""
    return Scalars(int(s["step"]) for s in states)


__all__ = ["CompiledOptimizer", "check_hyperparameters", "rows_cols", "steps"]
