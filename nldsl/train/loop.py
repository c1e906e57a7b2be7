"""The training loop: model, optimizer, data by step index, evaluation, checkpoints, metrics.

``train(cfg)`` returns a :class:`RunResult` whatever happens: a finished run, Ctrl-C (a
checkpoint is saved, exit 130), a diverged loss (stop, keep the last good checkpoint, exit 1),
an unwritable output (exit 2). Errors the user must fix before anything runs (unknown task,
missing data, a model that cannot be built at the asked size) raise :class:`RunError`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from nldsl.nn.model import surprise_learners
from nldsl.train import checkpoint as ckpt
from nldsl.train import distributed as D
from nldsl.train.build import BuildError, build_model, make_optimizer, model_changed, optimizer_class
from nldsl.train.config import RunConfig, lr_at
from nldsl.train.tasks import IGNORE, Batch, Continual, TaskError, make_task

EXIT_OK, EXIT_FAILED, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 130
LN2 = math.log(2.0)


class RunError(Exception):
    """A problem with what the user asked for; nothing was trained. ``code`` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_IO):
        super().__init__(message)
        self.code = code


class _Diverged(Exception):
    pass


class _IOFailure(Exception):
    pass


@dataclass
class RunResult:
    exit_code: int
    status: str  # ok | time_limit | interrupted | diverged | io_error
    message: str | None
    step: int
    out: Path
    info: dict = field(default_factory=dict)
    task: str = ""
    metric: str = "acc"
    chance: float | None = None  # guessing among all possible answers
    context_chance: float | None = None  # guessing among the candidates in the context
    rows: list = field(default_factory=list)  # the metrics.jsonl rows
    final: dict = field(default_factory=dict)  # the last evaluation
    stream: dict | None = None  # per-segment metrics of the streaming evaluation
    continual: dict | None = None
    checkpoint: str | None = None
    elapsed: float = 0.0
    tokens_per_s: float | None = None
    device: str = ""
    dtype: str = ""
    world: int = 1
    files: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: expected auto, cpu or cuda")
    return torch.device(name)


def _dtypes(name: str):
    """(parameter dtype, autocast dtype or None)."""
    if name == "float32":
        return torch.float32, None
    if name == "float64":
        return torch.float64, None
    if name == "bfloat16":  # mixed precision: float32 weights and optimizer, bf16 compute
        return torch.float32, torch.bfloat16
    raise RunError(f"--dtype {name}: expected float32, bfloat16 or float64")


def set_determinism(seed: int, device: torch.device) -> None:
    """Seeds every generator and asks for deterministic kernels (warn-only: an op without a
    deterministic kernel warns instead of failing)."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def _call(model, inputs, labels, amp, **kw):
    """``model(inputs, **kw)``, with ``labels`` when given and the model has memories that learn
    from them (``signal surprise``; a hand-written model's own forward need not take labels),
    under autocast to ``amp`` when set."""
    if labels is not None and surprise_learners(model):
        kw["labels"] = labels
    if amp is None:
        return model(inputs, **kw)
    with torch.autocast(device_type=inputs.device.type, dtype=amp):
        return model(inputs, **kw)


def _scored_logits(model, batch: Batch, device, amp):
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    out = _call(model, inputs, targets if batch.next_tokens else None, amp)
    logits = _logits(out)
    mask = targets != IGNORE
    sel = logits[mask]
    if sel.dtype in (torch.bfloat16, torch.float16):
        sel = sel.float()
    return sel, targets[mask], out


def _sums(sel, tgt) -> torch.Tensor:
    """[summed cross-entropy, correct predictions, scored tokens] in float64."""
    if sel.dtype in (torch.bfloat16, torch.float16):
        sel = sel.float()
    ce = F.cross_entropy(sel, tgt, reduction="sum")
    correct = (sel.argmax(-1) == tgt).sum()
    return torch.stack([ce.double(), correct.double(), torch.tensor(float(tgt.numel()), device=ce.device,
                                                                    dtype=torch.float64)])


def _metrics(ce: float, correct: float, count: float) -> dict:
    loss = ce / max(count, 1.0)
    return {"loss": loss, "acc": correct / max(count, 1.0), "bpb": loss / LN2}


@torch.no_grad()
def evaluate(model, batches: list[Batch], dist: D.Dist, device, amp) -> dict:
    """Loss, accuracy and bits per byte over the held-out batches (sharded over ranks)."""
    was = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64, device=device)
    try:
        for b in batches:
            sel, tgt, _ = _scored_logits(model, b.shard(dist.rank, dist.world), device, amp)
            acc += _sums(sel, tgt)
    finally:
        model.train(was)
    dist.all_reduce_(acc)
    return _metrics(*acc.tolist())


@torch.no_grad()
def stream_evaluate(model, task, dist: D.Dist, device, amp, n: int, segments: int, seg_len: int) -> dict:
    """Feeds one long stream per row in ``segments`` calls and reports the metric per segment.

    ``carry``: the state returned by each call is passed to the next (the in-context levels
    keep learning across calls); ``reset``: every call starts from no state; ``new_sequence``
    (only when the model has carry levels): ``model.new_sequence(state)`` between calls, which
    resets the sequence-scoped levels and keeps the carry levels.
    """
    from nldsl.train.distributed import unwrap

    core = unwrap(model)
    batch = task.stream_batch(n, segments, seg_len).shard(dist.rank, dist.world)
    modes = ["carry", "reset"]
    if any(getattr(lv, "scope", "") == "carry" for lv in getattr(core, "levels", ())):
        modes.append("new_sequence")
    was = model.training
    model.eval()
    result: dict[str, list] = {}
    try:
        for mode in modes:
            sums = torch.zeros(segments, 3, dtype=torch.float64, device=device)
            state = None
            for s in range(segments):
                piece = Batch(batch.inputs[:, s * seg_len:(s + 1) * seg_len],
                              batch.targets[:, s * seg_len:(s + 1) * seg_len], batch.next_tokens)
                inputs, targets = piece.inputs.to(device), piece.targets.to(device)
                if mode == "reset":
                    state = None
                elif mode == "new_sequence" and state is not None:
                    state = core.new_sequence(state)
                out = _call(model, inputs, targets if piece.next_tokens else None, amp, state=state)
                state = out[1] if isinstance(out, tuple) else out.state
                mask = targets != IGNORE
                if mask.any():
                    sums[s] += _sums(_logits(out)[mask], targets[mask])
            dist.all_reduce_(sums)
            result[mode] = [_metrics(*row) for row in sums.tolist()]
    finally:
        model.train(was)
    return {"segments": segments, "seg_len": seg_len, "sequences": n, "modes": result}


# ----------------------------------------------------------------------------------------------
class Metrics:
    """metrics.jsonl: one JSON object per log step, flushed as written (rank 0 only)."""

    def __init__(self, path: Path, keep_until: int | None, enabled: bool):
        self.path, self.enabled, self.rows = path, enabled, []
        if not enabled:
            return
        if keep_until is not None and path.exists():  # resuming: drop rows past the checkpoint
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step", 0) <= keep_until:
                    self.rows.append(row)
            ckpt.atomic_write(path, "".join(json.dumps(r) + "\n" for r in self.rows))
        else:
            ckpt.atomic_write(path, "")
        self._f = open(path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def sync(self) -> None:
        if self.enabled:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self.enabled:
            try:
                self._f.close()
            except OSError:
                pass


def prepare_out(out: Path) -> None:
    """Creates the output folder and proves it is writable, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nldsl-write-test-{os.getpid()}"
        ckpt._write_bytes(probe, b"ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"cannot write to the output folder {out}: {e.strerror or e}", EXIT_IO) from None


def _summarize_info(info: dict) -> dict:
    return {k: v for k, v in info.items() if k != "levels"} | {"levels": info.get("levels", [])}


# ----------------------------------------------------------------------------------------------
def setup(cfg: RunConfig, dist: D.Dist | None = None, *, device=None):
    """Validates the run and builds its pieces; raises RunError for anything the user must fix."""
    dist = dist or D.Dist()
    device = device or resolve_device(cfg.device)
    param_dtype, amp = _dtypes(cfg.dtype)
    if amp is not None and device.type == "cpu":
        amp = torch.bfloat16  # CPU autocast supports bfloat16
    if cfg.task not in ("mqar", "lm", "niah", "continual"):
        make_task(cfg.task, vocab=256, seq_len=1, seed=0, steps=1)  # raises TaskError with did-you-mean
    if cfg.batch < 1 or cfg.steps < 1:
        raise RunError("--batch and --steps must be positive")
    if cfg.batch % dist.world:
        raise RunError(f"--batch {cfg.batch} cannot be split evenly over {dist.world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(cfg.seed, device)
    model, info = build_model(cfg.spec, cfg.overrides, name=cfg.model)
    impl = getattr(getattr(model, "config", None), "impl", "chunked")
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RunError(f"impl=triton: the spec's generated Triton kernels run on a CUDA device, and this run is "
                       f"on {device.type}; use --device cuda, or leave impl out (the PyTorch ops compute the same)")
    vocab = info.get("vocab") or getattr(getattr(model, "config", None), "vocab", 256)
    seq_len = cfg.seq_len or info.get("context") or 512
    task = make_task(cfg.task, vocab=vocab, seq_len=seq_len, seed=cfg.seed, steps=cfg.steps,
                     pairs=cfg.pairs, needles=cfg.needles, data=cfg.data, phases=cfg.phases)
    return SimpleNamespace(dist=dist, device=device, param_dtype=param_dtype, amp=amp, model=model,
                           info=info, task=task, seq_len=seq_len)


def _unnormalised_keys_hint(model) -> str:
    """A sentence for a diverged run whose in-context memories were told not to normalise (the
    default normalises them): a step towards a target moves M(k) by about eta ||k||^2, and the
    delta-rule erase (I - eta k k^T) shrinks the state only while that stays below 2; an MLP's
    hidden layers are its later layers' keys."""
    from nldsl.ir.models import moves_along_key
    from nldsl.nn.deep import DeepMemory, SelfModifyingTitans
    from nldsl.nn.memories import LinearMemory

    raw_keys, raw_hidden, raw_values = set(), set(), set()
    for path, m in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if isinstance(m, LinearMemory) and m.op != "linear_attention" and not m.shared_kv:
            erases, hidden_norm = moves_along_key(m.objective, "dgd" if m.op == "dgd" else m.rule), "l2"
        elif isinstance(m, DeepMemory):
            erases, hidden_norm = moves_along_key(m.objective, m.rule, "mlp"), m.hidden_norm
        elif isinstance(m, SelfModifyingTitans):  # its memories' targets M(v) grow with M_v unless v is bounded
            one_layer = len(m.memories["memory"]) == 1
            erases, hidden_norm = True, "l2" if one_layer else m.hidden_norm
            if m.v_norm != "l2" and "v" in m.generated:
                raw_values.add(name)
        else:
            continue
        if erases and m.qk_norm != "l2":
            raw_keys.add(name)
        if erases and hidden_norm != "l2":
            raw_hidden.add(name)
    fixes = []
    if raw_keys:
        fixes.append(f"the keys of {_names(raw_keys)} (`qk_norm l2`)")
    if raw_hidden:
        fixes.append(f"the hidden layers of {_names(raw_hidden)} (`mlp(..., norm=l2)`)")
    if raw_values:
        fixes.append(f"the generated values of {_names(raw_values)} (`v_norm l2`)")
    if not fixes:
        return ""
    why = ("a step towards a target moves M(k) by about eta ||k||^2, which diverges past 2"
           + ("; self-generated targets M(v) grow with the memory that generates v" if raw_values else ""))
    return f"; or normalise {' and '.join(fixes)}: {why}"


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in sorted(names))


def train(cfg: RunConfig, callbacks: tuple[Callable, ...] = (), *, quiet: bool = False) -> RunResult:
    """Runs ``cfg``; see the module docstring for what it returns and raises."""
    dist = D.init(resolve_device(cfg.device).type)
    try:
        return _train(cfg, dist, callbacks, quiet)
    finally:
        dist.close()


def _say(dist, quiet, msg):
    if dist.main and not quiet:
        print(msg, file=sys.stderr, flush=True)


def _train(cfg: RunConfig, dist: D.Dist, callbacks, quiet) -> RunResult:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    try:
        parts = setup(cfg, dist)
    except (BuildError, TaskError) as e:
        raise RunError(str(e), EXIT_IO) from None
    device, amp, task, model, info = parts.device, parts.amp, parts.task, parts.model, parts.info
    seq_len = parts.seq_len
    if dist.main:
        prepare_out(out)
    dist.barrier()
    ck_root = out / "checkpoints"
    if dist.main:
        ckpt.clean_temporaries(ck_root)

    # -- resume ------------------------------------------------------------------------------
    start, resume_meta, extra = 0, None, None
    if cfg.resume:
        found = ckpt.find_latest(ck_root)
        if found is None:
            raise RunError(f"--resume: no complete checkpoint in {ck_root}", EXIT_IO)
        folder, _ = found
        weights, extra, resume_meta = ckpt.load_checkpoint(folder)
        old = RunConfig.from_dict(resume_meta.get("config", {}))
        same = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 (tuples read back as lists)
        before, now = old.identity(), cfg.identity()
        diff = [k for k in RunConfig.IDENTITY if same(before[k]) != same(now[k])]
        changed = model_changed(resume_meta, info)
        if changed == "spec":
            diff.append("spec (the spec file changed)")
        elif changed == "defaults":
            diff.append("the compiled model (the same spec resolves differently: a default of this nldsl "
                        "version differs; `nldsl fmt --resolved` shows the spec's)")
        if diff:
            raise RunError(f"--resume: {folder} was written by a run with different settings "
                           f"({', '.join(diff)}); resume with the same settings, or start a new run "
                           f"in another --out folder", EXIT_IO)
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise RunError(f"--resume: {folder} does not fit this model: {e}", EXIT_IO) from None
        start = int(resume_meta["step"])
        if start > cfg.steps:
            raise RunError(f"--resume: the checkpoint is at step {start}, past --steps {cfg.steps}", EXIT_IO)
        _say(dist, quiet, f"resuming from {folder} (step {start})")
        if old.steps != cfg.steps:
            _say(dist, quiet, f"note: --steps changed from {old.steps} to {cfg.steps}; the learning-rate "
                              f"schedule follows the new total")

    model.to(device=device, dtype=parts.param_dtype)
    model.train()
    wrapped, kind = D.wrap(model, dist, device, cfg.fsdp)
    opt, opt_name, opt_note = make_optimizer(wrapped, info.get("optimizer"), cfg.lr, cfg.weight_decay, spec=cfg.spec)
    notes = [opt_note] if opt_note else []
    if extra is not None:
        # a checkpoint written before nldsl recorded its optimizer was trained by torch.optim's
        before = resume_meta.get("optimizer") or optimizer_class(info.get("optimizer"))[0].__name__
        if before != opt_name:
            raise RunError(f"--resume: the checkpoint was trained by {before}, and this run trains with {opt_name}, "
                           "whose state is another; start a new run in another --out folder, or resume with the "
                           "nldsl version that wrote it", EXIT_IO)
        if kind == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(wrapped, getattr(opt, "parts", opt), extra["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(extra["optimizer"])
        ckpt.set_rng_state(extra.get("rng", {}))

    metrics = Metrics(out / "metrics.jsonl", start if cfg.resume else None, dist.main)
    continual: dict | None = None
    if isinstance(task, Continual):
        continual = (resume_meta or {}).get("continual") or {
            "phases": task.phase_names, "metrics": [p.metric for p in task.phases], "after": []}

    res = RunResult(EXIT_OK, "ok", None, start, out, info=info, task=task.describe(),
                    metric=task.metric, chance=task.chance(), context_chance=task.context_chance(),
                    device=str(device), dtype=cfg.dtype, world=dist.world, notes=notes, continual=continual)
    res.rows = metrics.rows
    if dist.main:
        try:
            ckpt.atomic_write(out / "run.json", json.dumps(
                {"config": cfg.to_dict(), "model": _summarize_info(info), "task": task.spec(),
                 "optimizer": opt_name, "device": str(device), "world": dist.world, "parallel": kind,
                 "torch": torch.__version__}, indent=1, default=str))
        except OSError as e:
            raise RunError(f"cannot write to the output folder {out}: {e.strerror or e}", EXIT_IO) from None

    eval_n = max(cfg.batch, math.ceil(cfg.eval_seqs / cfg.batch) * cfg.batch)
    eval_sets: dict[int, list[Batch]] = {}

    def eval_now(step) -> dict:
        row: dict[str, Any] = {}
        if isinstance(task, Continual):
            current = task.phase_of(max(step - 1, 0))
            for j in range(current + 1):
                if j not in eval_sets:
                    eval_sets[j] = task.phases[j].eval_batches(eval_n, cfg.batch)
                m = evaluate(wrapped, eval_sets[j], dist, device, amp)
                row[f"phase{j}_{task.phases[j].metric}"] = m[task.phases[j].metric]
                row[f"phase{j}_loss"] = m["loss"]
                if j == 0:
                    row.update({"eval_loss": m["loss"], task.metric: m[task.metric]})
        else:
            if 0 not in eval_sets:
                eval_sets[0] = task.eval_batches(eval_n, cfg.batch)
            m = evaluate(wrapped, eval_sets[0], dist, device, amp)
            row = {"eval_loss": m["loss"], task.metric: m[task.metric]}
        return row

    def state_json(step):
        return {"config": cfg.to_dict(), "spec_hash": info.get("spec_hash", ""),
                "resolved_hash": info.get("resolved_hash", ""), "model": info.get("class"),
                "data_position": {"step": step, "scheme": "batch = f(seed, step)"},
                "continual": continual, "last_loss": last[0], "world": dist.world, "optimizer": opt_name}

    saved_at = [start if cfg.resume else None]

    def save(step):
        """A checkpoint at ``step``; raises _IOFailure (every rank) when it cannot be written."""
        if saved_at[0] == step:
            return
        if kind == "fsdp":
            from torch.distributed.checkpoint import state_dict as dcp

            o = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd = D.full_state_dict_shapes(wrapped, dcp.get_model_state_dict(wrapped, options=o))
            osd = dcp.get_optimizer_state_dict(wrapped, getattr(opt, "parts", opt), options=o)
        else:
            msd, osd = D.unwrap(wrapped).state_dict(), opt.state_dict()
        err = None
        if dist.main:
            try:
                metrics.sync()
                folder = ckpt.save_checkpoint(ck_root, step, msd, osd, state_json(step), cfg.keep)
                res.checkpoint = str(folder)
            except ckpt.CheckpointError as e:
                err = str(e)
            except OSError as e:
                err = f"cannot write to {out}: {e.strerror or e}"
        err = dist.broadcast_object(err)
        if err:
            raise _IOFailure(err)
        saved_at[0] = step

    # -- the loop ----------------------------------------------------------------------------
    tokens_per_step = cfg.batch * seq_len
    show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = None
    _say(dist, quiet,
         f"training {info['class']} ({info['parameters'] / 1e6:.2f}M parameters) on {task.describe()}, "
         f"{cfg.steps} steps, batch {cfg.batch} x {seq_len} tokens, {device} {cfg.dtype}"
         + (f", {dist.world} processes ({kind})" if dist.enabled else ""))
    for note in notes:
        _say(dist, quiet, f"note: {note}")
    if dist.main and show_bar and not quiet:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"{info['class']} {cfg.task}", unit="step",
                   file=sys.stderr, dynamic_ncols=True, leave=True)
    ckpt_every = cfg.ckpt_every or cfg.eval_every
    last = [None, None]  # (loss, step) of the last finite loss
    step = start
    interval_tokens, interval_time, interval_losses = 0, 0.0, []
    all_time, all_tokens = 0.0, 0
    ctx = SimpleNamespace(model=wrapped, optimizer=opt, cfg=cfg, step=step, loss=None)
    stop_reason = None
    stopper = _SoftStop(lambda msg: _say(dist, quiet, msg) if bar is None else bar.write(msg))
    in_step = False  # between a step's first change to the weights and its metrics row
    try:
        try:
            stopper.install()
            while step < cfg.steps:
                if stopper.agreed(dist):
                    raise KeyboardInterrupt
                ctx.step = step
                for cb in callbacks:
                    cb(step, ctx)
                in_step = True
                t0 = time.perf_counter()
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                batch = task.train_batch(step, cfg.batch)
                count = batch.scored
                sel, tgt, _ = _scored_logits(wrapped, batch.shard(dist.rank, dist.world), device, amp)
                ce = F.cross_entropy(sel, tgt, reduction="sum")
                total = dist.all_reduce_(ce.detach().double().clone())
                loss_value = float(total) / max(count, 1)
                if not math.isfinite(loss_value):
                    raise _Diverged(f"the loss is {loss_value} at step {step + 1}")
                (ce * (dist.world / max(count, 1))).backward()
                max_norm = cfg.clip if cfg.clip > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
                gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
                if not math.isfinite(gnorm):
                    opt.zero_grad(set_to_none=True)
                    raise _Diverged(f"the gradient norm is {gnorm} at step {step + 1}")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step += 1
                res.step = step
                last[:] = [loss_value, step]
                ctx.loss = loss_value
                dt = time.perf_counter() - t0
                interval_tokens += tokens_per_step
                interval_time += dt
                all_tokens += tokens_per_step
                all_time += dt
                interval_losses.append(loss_value)

                is_eval = step % cfg.eval_every == 0 or step == cfg.steps
                phase_end = isinstance(task, Continual) and step in task.ends
                timed_out = False
                if cfg.time_limit is not None:
                    timed_out = bool(dist.broadcast_object(time.perf_counter() - t_start > cfg.time_limit))
                if timed_out:
                    is_eval, stop_reason = True, "time_limit"
                if step % cfg.log_every == 0 or is_eval or phase_end:
                    row = {"step": step, "loss": loss_value,
                           "loss_avg": sum(interval_losses) / len(interval_losses), "lr": lr,
                           "grad_norm": gnorm,
                           "tokens_per_s": interval_tokens / max(interval_time, 1e-9)}
                    if isinstance(task, Continual):
                        row["phase"] = task.phase_of(step - 1)
                    if is_eval or phase_end:
                        row.update(eval_now(step))
                        res.final = {k: v for k, v in row.items() if k not in ("lr", "grad_norm")}
                    if phase_end and continual is not None:
                        done = task.ends.index(step)
                        if len(continual["after"]) <= done:
                            continual["after"].append(
                                [row.get(f"phase{j}_{task.phases[j].metric}") for j in range(done + 1)])
                    interval_tokens, interval_time, interval_losses = 0, 0.0, []
                    try:
                        metrics.write(row)
                    except OSError as e:
                        raise _IOFailure(f"cannot write {metrics.path}: {e.strerror or e}") from None
                    if bar is None and (is_eval or phase_end):
                        _say(dist, quiet, _progress_line(row, task.metric, cfg.steps))
                if bar is not None:
                    post = {"loss": f"{loss_value:.3f}", "tok/s": f"{tokens_per_step / max(dt, 1e-9):,.0f}"}
                    if task.metric in res.final:
                        post[task.metric] = f"{res.final[task.metric]:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                in_step = False
                if step % ckpt_every == 0 or phase_end or step == cfg.steps or timed_out:
                    save(step)
                if timed_out:
                    break
        except KeyboardInterrupt:
            if bar is not None:
                bar.close()
                bar = None
            res.status, res.exit_code = "interrupted", EXIT_INTERRUPTED
            if in_step:  # a second Ctrl-C in the middle of a step: its weights may be half-updated
                res.message = (f"interrupted in the middle of step {step + 1}; not saving a half-finished "
                               f"step; the last checkpoint is {_latest(ck_root)}")
            elif kind == "fsdp" and not stopper.requested:
                res.message = (f"interrupted at step {step}; the last checkpoint is {_latest(ck_root)}")
            else:
                try:
                    opt.zero_grad(set_to_none=True)
                    save(step)
                    res.message = (f"interrupted at step {step}; saved a checkpoint at step {step} in "
                                   f"{res.checkpoint}; continue with --resume")
                except _IOFailure as e:
                    res.status, res.exit_code = "io_error", EXIT_IO
                    res.message = (f"interrupted at step {step}, and {e}; the last good checkpoint is "
                                   f"{_latest(ck_root)}")
                except KeyboardInterrupt:
                    res.message = (f"interrupted again while saving; the last complete checkpoint is "
                                   f"{_latest(ck_root)}")
        except _Diverged as e:
            res.status, res.exit_code = "diverged", EXIT_FAILED
            lf = (f"the last finite loss was {last[0]:.4f} at step {last[1]}" if last[0] is not None
                  else "no step finished with a finite loss")
            res.message = (f"stopped: {e}; {lf}. The diverged weights were not saved; the last good "
                           f"checkpoint is {_latest(ck_root)}. Try a lower --lr or --clip"
                           + _unnormalised_keys_hint(model))
        except _IOFailure as e:
            res.status, res.exit_code = "io_error", EXIT_IO
            res.message = f"{e}; the last good checkpoint is {_latest(ck_root)}; nothing was overwritten"
        else:
            if stop_reason == "time_limit":
                res.status = "time_limit"
                res.message = f"stopped at step {step} after the --time-limit of {cfg.time_limit:g} s"
            if not res.final and step > 0:  # nothing left to train (a finished run resumed)
                res.final = {"step": step, **eval_now(step)}
            if cfg.carry_state:
                n = max(dist.world, min(cfg.batch, 64) // dist.world * dist.world)
                try:
                    res.stream = stream_evaluate(wrapped, task, dist, device, amp, n, cfg.segments, seq_len)
                except TaskError as e:
                    res.notes.append(f"streaming evaluation skipped: {e}")
    finally:
        stopper.uninstall()
        if bar is not None:
            bar.close()
        metrics.close()
    res.elapsed = time.perf_counter() - t_start
    res.tokens_per_s = all_tokens / all_time if all_time > 0 else None
    if res.checkpoint is None:
        latest = ckpt.find_latest(ck_root) if dist.main else None
        res.checkpoint = str(latest[0]) if latest else None
    if dist.main:
        _write_outputs(res, cfg)
    return res


class _SoftStop:
    """Ctrl-C (SIGINT) or SIGTERM during training: the current step finishes, its metrics are
    written, a checkpoint is saved, and the run exits 130. A second signal stops at once (without
    saving a half-finished step). Ranks agree on the step they stop at."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, say):
        self.say, self.requested, self._old = say, False, {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("stopping after this step, then saving a checkpoint (Ctrl-C again to stop at once)")

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):
                    pass

    def uninstall(self) -> None:
        import signal

        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass
        self._old = {}

    def agreed(self, dist: D.Dist) -> bool:
        if not dist.enabled:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0],
                            device="cuda" if dist.backend == "nccl" else "cpu")
        dist.all_reduce_(flag)
        return bool(flag.item() > 0)


def _latest(root: Path) -> str:
    found = ckpt.find_latest(root)
    return str(found[0]) if found else "none (no checkpoint was written yet)"


def _progress_line(row, metric, steps) -> str:
    parts = [f"step {row['step']}/{steps}", f"loss {row['loss']:.4f}"]
    if "eval_loss" in row:
        parts.append(f"eval loss {row['eval_loss']:.4f}")
    if metric in row:
        parts.append(f"{metric} {row[metric]:.4f}")
    parts.append(f"{row['tokens_per_s']:,.0f} tokens/s")
    return " | ".join(parts)


def _write_outputs(res: RunResult, cfg: RunConfig) -> None:
    """results.json and the plot; a failure here is reported, never raised over the result."""
    from nldsl.train.report import plot_run, results_dict

    out = res.out
    try:
        ckpt.atomic_write(out / "results.json", json.dumps(results_dict(res), indent=1, default=str))
        res.files.append(str(out / "results.json"))
    except OSError as e:
        res.notes.append(f"could not write results.json: {e.strerror or e}")
        if res.exit_code == EXIT_OK:
            res.exit_code, res.status = EXIT_IO, "io_error"
    if cfg.plot and res.rows:
        try:
            plot_run(res, out / "curves.png")
            res.files.append(str(out / "curves.png"))
        except OSError as e:
            res.notes.append(f"could not write the plot: {e.strerror or e}")
    res.files.insert(0, str(out / "metrics.jsonl"))
