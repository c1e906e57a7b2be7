"""From a spec (or a hand-written model file) to a model instance and its optimizer.

``build_model(spec_path, overrides)`` compiles the spec with ``nldsl.compile`` and
instantiates its model class with keyword overrides. A ``.py`` file is accepted as well
(``path/to/model.py`` or ``path/to/model.py:ClassName``): it is imported and its
:class:`~nldsl.nn.model.NSAMModel` subclass is used, which lets a user train a hand-written
model with the same loop (and the tests do not depend on the compiler).

Every failure is raised as :class:`BuildError` with a message meant for the user; a spec with
errors raises ``nldsl.SpecError`` (its diagnostics render at the spec's text).
"""
from __future__ import annotations

import ast
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any


class BuildError(Exception):
    """The model or optimizer cannot be built; the message says why, for the user."""


def parse_override(text: str) -> tuple[str, Any]:
    """``"dim=64"`` -> ``("dim", 64)``: Python literals (int, float, bool, None, tuples, quoted
    strings) are parsed; anything else stays a string (``act=gelu`` -> ``"gelu"``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise BuildError(f"override {text!r} is not of the form key=value (for example dim=64)")
    raw = raw.strip()
    lowered = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in lowered:
        return key, lowered[raw.lower()]
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def parse_overrides(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        k, v = parse_override(item)
        out[k] = v
    return out


def _import_py(path: Path):
    name = f"nldsl_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"{path}: cannot import this file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise BuildError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    return module


def _compile_spec(path: Path):
    import nldsl

    compile_fn = getattr(nldsl, "compile", None)
    if compile_fn is None:
        raise BuildError(
            f"{path}: this install of nldsl has no model compiler yet (nldsl.compile is missing), "
            "so specs cannot be trained; a hand-written model file works meanwhile: "
            "nldsl run path/to/model.py:ClassName")
    return compile_fn(str(path))  # nldsl.SpecError propagates: the caller renders diagnostics


def model_classes(module) -> list[type]:
    """The NSAMModel subclasses a module defines, in definition order."""
    from nldsl.nn.model import NSAMModel

    out = []
    for value in vars(module).values():
        if (inspect.isclass(value) and issubclass(value, NSAMModel) and value is not NSAMModel
                and value.__module__ == module.__name__):
            out.append(value)
    return out


def resolve_class(spec: str, name: str | None = None):
    """The model class for ``spec`` (``file.nl``, ``file.py`` or ``file.py:Class``)."""
    path_text, cls_name = spec, name
    if ":" in spec and not Path(spec).exists():
        path_text, _, suffix = spec.rpartition(":")
        cls_name = cls_name or suffix
    path = Path(path_text)
    if not path.exists():
        raise BuildError(f"{path}: no such file")
    if path.is_dir():
        raise BuildError(f"{path}: is a directory, not a spec file")
    module = _import_py(path) if path.suffix == ".py" else _compile_spec(path)
    classes = model_classes(module)
    if cls_name:
        for c in classes:
            if c.__name__ == cls_name:
                return c
        have = ", ".join(c.__name__ for c in classes) or "none"
        raise BuildError(f"{path} has no model named {cls_name!r} (models: {have})")
    if not classes:
        raise BuildError(f"{path} defines no model (an optimizer-only spec cannot be trained)")
    return classes[0]


def accepted_keywords(cls) -> list[str] | None:
    """The keyword arguments the model class takes, or None when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    names = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            return None
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def instantiate(cls, overrides: dict[str, Any]):
    """``cls(**overrides)`` with the failure explained: an unknown key (with did-you-mean) or a
    size the model cannot be built at (``dim`` not divisible by ``heads``, ...)."""
    from nldsl.diagnostics import suggest

    accepted = accepted_keywords(cls)
    if accepted is not None:
        for key in overrides:
            if key not in accepted:
                raise BuildError(f"{cls.__name__} has no setting {key!r}; "
                                 f"{suggest(key, accepted, 'settings')}")
    shown = " ".join(f"{k}={v!r}" for k, v in overrides.items()) or "its spec's values"
    try:
        return cls(**overrides)
    except Exception as e:  # the model rejects this size: say which and why, never a traceback
        raise BuildError(f"cannot build {cls.__name__} with {shown}: {e}") from e


def model_info(model, overrides: dict[str, Any]) -> dict[str, Any]:
    cls = type(model)
    cfg = getattr(model, "config", None)
    return {
        "class": cls.__name__,
        "spec_file": getattr(cls, "spec_file", "") or "",
        "spec_hash": getattr(cls, "spec_hash", "") or "",
        "resolved_hash": getattr(cls, "resolved_hash", "") or "",
        "optimizer": getattr(cls, "optimizer", None),
        "levels": [str(lv) for lv in getattr(cls, "levels", ())],
        "overrides": dict(overrides),
        "vocab": getattr(cfg, "vocab", None),
        "dim": getattr(cfg, "dim", None),
        "layers": getattr(cfg, "layers", None),
        "context": getattr(cfg, "context", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def model_changed(meta: dict, info: dict) -> str | None:
    """Why a checkpoint (its state.json ``meta``) may not hold the weights of the model built now
    (its :func:`model_info`): ``"spec"`` when the spec's text changed, ``"defaults"`` when the same
    text resolves to another model (a default of this nldsl differs), else None."""
    if meta.get("spec_hash", "") != info.get("spec_hash", ""):
        return "spec"
    if meta.get("resolved_hash") not in (None, info.get("resolved_hash", "")):
        return "defaults"
    return None


def build_model(spec_path: str, overrides: dict[str, Any] | None = None, *, name: str | None = None):
    """``(model, info)`` for the spec's model class built with keyword ``overrides``."""
    overrides = dict(overrides or {})
    cls = resolve_class(str(spec_path), name)
    model = instantiate(cls, overrides)
    return model, model_info(model, overrides)


# -- optimizer ---------------------------------------------------------------------------------
def spec_optimizer(spec: str | None, name: str | None):
    """The compiled optimizer class ``name`` of a ``.nl`` spec, defined in it or in a file it
    includes (``optimizer = AdamW`` beside ``include "adam.nl"``), and that file; None for a
    hand-written model file or no name. A spec the compiler refuses raises its SpecError."""
    if not spec or not name or not str(spec).endswith(".nl") or not Path(spec).is_file():
        return None
    import nldsl
    from nldsl.spec import analyze_file

    todo, seen = [analyze_file(spec)], set()
    while todo:
        a = todo.pop(0)
        if a.file in seen:
            continue
        seen.add(a.file)
        if a.ir is not None and any(o.name == name for o in a.ir.optimizers):
            return getattr(nldsl.compile(a.file), name), a.file
        todo += list(a.included.values())
    return None


def optimizer_class(name: str | None):
    """torch.optim's class for ``name`` (a hand-written model's ``optimizer``), AdamW for none:
    ``(class, whether it is the one named)``."""
    import torch

    table = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD,
             "Adagrad": torch.optim.Adagrad, "AdaGrad": torch.optim.Adagrad}
    if name in table:
        return table[name], True
    return torch.optim.AdamW, name is None


class WithAux:
    """A matrix-only optimizer (Muon, M3) over the hidden matrices, and torch.optim.AdamW over
    the embedding, the head and every vector, as one optimizer for the loop: ``param_groups``
    (both's, for the learning-rate schedule), ``step``, ``zero_grad``, ``state_dict`` /
    ``load_state_dict``; ``parts`` for torch.distributed.checkpoint."""

    def __init__(self, main, aux):
        self.parts = (main, aux)

    @property
    def param_groups(self):
        return [g for part in self.parts for g in part.param_groups]

    def step(self):
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True):
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"main": self.parts[0].state_dict(), "aux": self.parts[1].state_dict()}

    def load_state_dict(self, state):
        self.parts[0].load_state_dict(state["main"])
        self.parts[1].load_state_dict(state["aux"])


def make_optimizer(model, name: str | None, lr: float, weight_decay: float | None, spec: str | None = None):
    """``(optimizer, its name, a note or None)``: the spec's compiled optimizer when the spec
    names one (``spec``: the model's ``.nl`` file), else torch.optim's (AdamW by default); weight
    decay only on matrices, and only for an optimizer that has it (None: the default,
    :data:`~nldsl.train.config.DEFAULT_WEIGHT_DECAY`; a note says when a given one does not apply)."""
    import torch

    from nldsl.optim.base import CompiledOptimizer
    from nldsl.train.config import DEFAULT_WEIGHT_DECAY

    found = spec_optimizer(spec, name)
    cls, exact = (found[0], True) if found else optimizer_class(name)
    notes = []
    params = [p for p in model.parameters() if p.requires_grad]
    takes_wd = not issubclass(cls, CompiledOptimizer) or "weight_decay" in cls.hyperparameters
    decay = DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay

    def groups(ps, decays: bool = takes_wd):
        """Weight decay on the matrices, none on the rest (no key at all for an optimizer without it)."""
        split = [([p for p in ps if p.dim() >= 2], decay), ([p for p in ps if p.dim() < 2], 0.0)]
        return [{"params": g, "weight_decay": wd} if decays else {"params": g} for g, wd in split if g]

    kwargs: dict[str, Any] = {"lr": lr}
    if not found and cls.__name__ == "SGD":
        kwargs["momentum"] = 0.9
    if found and cls.matrix_only:
        core = getattr(model, "module", model)
        outer = {id(p) for m in (getattr(core, "embed", None), getattr(core, "head", None)) if m is not None
                 for p in m.parameters()}
        main = [p for p in params if p.dim() >= 2 and id(p) not in outer]
        aux = [p for p in params if p.dim() < 2 or id(p) in outer]
        opt = WithAux(cls(groups(main), **kwargs), torch.optim.AdamW(groups(aux, decays=True), lr=lr))
        notes.append(f"{name} takes matrices only ({cls.matrix_only}): the embedding, the head and the vectors "
                     f"train with torch.optim.AdamW, as with torch.optim.Muon")
    else:
        opt = cls(groups(params), **kwargs)
    if found:
        used = f"{name} (compiled from {Path(found[1]).name})"
        if weight_decay and not takes_wd:
            beside = " (only to the AdamW beside it)" if cls.matrix_only else ""
            notes.append(f"--weight-decay does not apply to {name}, which has no weight_decay{beside}")
    else:
        used = cls.__name__
        if not exact:
            notes.append(f"the optimizer {name!r} is neither defined by the model's spec nor a torch.optim "
                         "optimizer; training with torch.optim.AdamW")
    return opt, used, "; ".join(notes) or None
