"""Embedded tasks: generated, or read from what every Python install has; nothing is fetched.

Every batch is a pure function of ``(seed, step)`` (a ``torch.Generator`` seeded from both), so
training resumes at any step with exactly the data an uninterrupted run would have seen, and
every rank of a distributed run generates the same *global* batch and takes its own slice.

A batch is ``(inputs [B, T] long, targets [B, T] long)``; ``targets == IGNORE`` where no
prediction is scored. Where the targets are the stream's next tokens (``lm``: each is the next
input, the last one the next call's), memories that learn from the outer loss's local surprise
(``signal surprise``, Hope's CMS) learn from them in context, in training and evaluation alike,
as they would from text read at deployment; the answers of ``mqar`` and ``niah`` are never
inputs, so no memory learns from them (at test time nobody would give them). Tasks:

* ``mqar``: multi-query associative recall (Zoology): ``k1 v1 ... kN vN`` then the keys again,
  in random order at random even offsets of a filler region; each key's target is its value.
  Keys and values come from disjoint token ranges. Metric: recall accuracy on the queries.
* ``lm``: byte-level language modelling on the Python standard library's own source (sorted,
  capped, held-out split by file), or ``--data FILE``. Metric: bits per byte.
* ``niah``: a haystack of random tokens, needle(s) ``[NEEDLE, key, value]`` at random depths,
  ``[QUERY, key]`` at the end; the target is the value. Metric: retrieval accuracy.
* ``continual``: phases trained one after the other (default MQAR over key set A, then over a
  disjoint key set B, then LM); after each phase every phase so far is evaluated, so the
  accuracy on earlier tasks after later ones (forgetting) is measured.
"""
from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IGNORE = -100
TASKS = ("mqar", "lm", "niah", "continual")


class TaskError(Exception):
    """A task cannot be set up as asked (missing data file, sizes that do not fit, ...)."""


@dataclass
class Batch:
    inputs: Tensor
    targets: Tensor
    #: the targets are the stream's next tokens: surprise-driven memories learn from them (above)
    next_tokens: bool = False

    @property
    def scored(self) -> int:
        return int((self.targets != IGNORE).sum())

    def shard(self, rank: int, world: int) -> "Batch":
        n = self.inputs.shape[0]
        per = n // world
        return Batch(self.inputs[rank * per:(rank + 1) * per], self.targets[rank * per:(rank + 1) * per],
                     self.next_tokens)


def generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, salt)."""
    h = hashlib.blake2b(f"{seed}:{step}:{salt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


EVAL_SALT, STREAM_SALT = 1, 2


class Task:
    name = "task"
    metric = "acc"  # "acc" (higher is better) or "bpb" (lower is better)

    def __init__(self, vocab: int, seq_len: int, seed: int):
        self.vocab, self.seq_len, self.seed = vocab, seq_len, seed

    # one global batch, a pure function of (seed, step)
    def sample(self, g: torch.Generator, n: int, seq_len: int) -> Batch:
        raise NotImplementedError

    def train_batch(self, step: int, batch: int) -> Batch:
        return self.sample(generator(self.seed, step), batch, self.seq_len)

    def eval_batches(self, n_seqs: int, batch: int) -> list[Batch]:
        """A fixed held-out set (the same at every evaluation), in batches of ``batch``."""
        out = []
        for i in range(max(1, math.ceil(n_seqs / batch))):
            out.append(self.sample(generator(self.seed, i, EVAL_SALT), batch, self.seq_len))
        return out

    def stream_batch(self, n: int, segments: int, seg_len: int) -> Batch:
        """One long stream per row for streaming evaluation (fed in ``segments`` calls)."""
        return self.sample(generator(self.seed, 0, STREAM_SALT), n, segments * seg_len)

    def chance(self) -> float | None:
        """Accuracy of guessing uniformly among all possible answers."""
        return None

    def context_chance(self) -> float | None:
        """Accuracy of guessing among the answers present in the sequence (what a model that
        learned the format, but not the association, gets)."""
        return None

    def describe(self) -> str:
        return self.name

    def spec(self) -> dict:
        return {"task": self.name}


# ----------------------------------------------------------------------------------------------
class MQAR(Task):
    """Zoology-style multi-query associative recall.

    Vocab layout: 0 is filler, keys are ``1 .. 1+nk``, values ``1+nk .. vocab``, with
    ``nk = (vocab - 1) // 2``. ``key_set`` ``"A"`` / ``"B"`` restricts keys to the lower / upper
    half of the key range (disjoint sets for the continual task); ``None`` uses all keys.
    """

    name = "mqar"
    FILLER = 0

    def __init__(self, vocab: int, seq_len: int, seed: int, pairs: int = 8, key_set: str | None = None):
        super().__init__(vocab, seq_len, seed)
        if vocab < 8:
            raise TaskError(f"mqar needs a vocabulary of at least 8 tokens, the model has {vocab}")
        self.pairs = pairs
        nk = (vocab - 1) // 2
        self.value_lo, self.value_hi = 1 + nk, vocab
        lo, hi = 1, 1 + nk
        if key_set is not None:
            mid = (lo + hi) // 2
            if key_set.upper() == "A":
                hi = mid
            elif key_set.upper() == "B":
                lo = mid
            else:
                raise TaskError(f"unknown mqar key set {key_set!r} (use A or B)")
        self.key_lo, self.key_hi, self.key_set = lo, hi, key_set
        if pairs < 1:
            raise TaskError("mqar needs at least 1 key-value pair")
        if pairs > hi - lo:
            raise TaskError(f"mqar with {pairs} pairs needs {pairs} distinct keys, "
                            f"the key range has {hi - lo} (vocab {vocab})")
        if seq_len < 4 * pairs:
            raise TaskError(f"mqar with {pairs} pairs needs a sequence of at least {4 * pairs} tokens "
                            f"({2 * pairs} for the pairs, {2 * pairs} for the queries); "
                            f"got --seq-len {seq_len}")

    def _pairs(self, g, n):
        nkeys = self.key_hi - self.key_lo
        keys = torch.rand(n, nkeys, generator=g).argsort(dim=1)[:, :self.pairs] + self.key_lo
        values = torch.randint(self.value_lo, self.value_hi, (n, self.pairs), generator=g)
        return keys, values

    def _queries(self, g, inputs, targets, keys, values, start, end):
        """Every key once, in random order, at random even offsets of ``[start, end)``."""
        n = keys.shape[0]
        slots = (end - start) // 2
        pos = torch.rand(n, slots, generator=g).argsort(dim=1)[:, :self.pairs] * 2 + start
        rows = torch.arange(n)[:, None].expand_as(pos)
        inputs[rows, pos] = keys
        targets[rows, pos] = values

    def sample(self, g, n, seq_len):
        keys, values = self._pairs(g, n)
        inputs = torch.full((n, seq_len), self.FILLER, dtype=torch.long)
        targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
        ctx = 2 * self.pairs
        inputs[:, 0:ctx:2] = keys
        inputs[:, 1:ctx:2] = values
        self._queries(g, inputs, targets, keys, values, ctx, seq_len)
        return Batch(inputs, targets)

    def stream_batch(self, n, segments, seg_len):
        """Pairs at the start of segment 0, then every key queried again in every segment:
        answering in segment s > 0 needs memory carried across calls."""
        g = generator(self.seed, 0, STREAM_SALT)
        keys, values = self._pairs(g, n)
        T = segments * seg_len
        inputs = torch.full((n, T), self.FILLER, dtype=torch.long)
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        ctx = 2 * self.pairs
        inputs[:, 0:ctx:2] = keys
        inputs[:, 1:ctx:2] = values
        self._queries(g, inputs, targets, keys, values, ctx, seg_len)
        for s in range(1, segments):
            self._queries(g, inputs, targets, keys, values, s * seg_len, (s + 1) * seg_len)
        return Batch(inputs, targets)

    def chance(self):
        return 1.0 / (self.value_hi - self.value_lo)

    def context_chance(self):
        return 1.0 / self.pairs

    def describe(self):
        ks = f", keys {self.key_set}" if self.key_set else ""
        return f"mqar ({self.pairs} pairs{ks})"

    def spec(self):
        return {"task": "mqar", "pairs": self.pairs, "key_set": self.key_set}


# ----------------------------------------------------------------------------------------------
STDLIB_CAP = 4_000_000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}


def stdlib_files() -> list[tuple[str, Path]]:
    """The standard library's .py files, sorted by relative path (no tests, no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        files.append((rel.as_posix(), f))
    files.sort()
    return files


def _held_out(rel: str) -> bool:
    """About 1 file in 16 is held out; decided by the file's name, so the split is stable."""
    return hashlib.blake2b(rel.encode(), digest_size=2).digest()[0] % 16 == 0


_CORPUS_CACHE: dict = {}


def stdlib_corpus(cap: int = STDLIB_CAP) -> tuple[Tensor, Tensor, dict]:
    """(train bytes, held-out bytes, info): source and docstrings of the standard library."""
    if cap in _CORPUS_CACHE:
        return _CORPUS_CACHE[cap]
    train, held, total, nfiles = [], [], 0, 0
    digest = hashlib.sha256()
    for rel, f in stdlib_files():
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if not data:
            continue
        data = data + b"\n"
        (held if _held_out(rel) else train).append(data)
        digest.update(rel.encode() + b"\0" + data)
        total += len(data)
        nfiles += 1
        if total >= cap:
            break
    tr, he = b"".join(train), b"".join(held)
    info = {"source": "python stdlib", "files": nfiles, "bytes": total, "train_bytes": len(tr),
            "heldout_bytes": len(he), "sha256": digest.hexdigest()[:16]}
    out = (_bytes(tr), _bytes(he), info)
    _CORPUS_CACHE[cap] = out
    return out


def file_corpus(path: str) -> tuple[Tensor, Tensor, dict]:
    """A user's text file: the last 5% (at least one sequence) is held out."""
    p = Path(path)
    if not p.exists():
        raise TaskError(f"--data {path}: no such file")
    if p.is_dir():
        raise TaskError(f"--data {path}: is a directory, not a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TaskError(f"--data {path}: cannot read ({e.strerror or e})") from None
    cut = int(len(data) * 0.95)
    tr, he = data[:cut], data[cut:]
    info = {"source": str(path), "bytes": len(data), "train_bytes": len(tr), "heldout_bytes": len(he),
            "sha256": hashlib.sha256(data).hexdigest()[:16]}
    return _bytes(tr), _bytes(he), info


def _bytes(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)


class LM(Task):
    name = "lm"
    metric = "bpb"

    def __init__(self, vocab, seq_len, seed, data: str | None = None, cap: int = STDLIB_CAP):
        super().__init__(vocab, seq_len, seed)
        if vocab < 256:
            raise TaskError(f"the byte-level lm task needs a vocabulary of 256 tokens, the model has {vocab}")
        self.data = data
        self.train, self.heldout, self.info = file_corpus(data) if data else stdlib_corpus(cap)
        need = seq_len + 1
        if len(self.train) < need or len(self.heldout) < need:
            raise TaskError(f"{self.info['source']}: too little text for --seq-len {seq_len} "
                            f"({len(self.train)} training and {len(self.heldout)} held-out bytes; "
                            f"each split needs at least {need})")

    @staticmethod
    def _windows(src: Tensor, offsets: Tensor, T: int) -> Batch:
        idx = offsets[:, None] + torch.arange(T + 1)[None, :]
        x = src[idx].long()
        return Batch(x[:, :-1].contiguous(), x[:, 1:].contiguous(), next_tokens=True)

    def sample(self, g, n, seq_len):
        offsets = torch.randint(0, len(self.train) - seq_len, (n,), generator=g)
        return self._windows(self.train, offsets, seq_len)

    def _heldout_offsets(self, n, T, index=0):
        span = len(self.heldout) - T - 1
        base = torch.arange(n) * max(1, span // max(1, n)) + index * 7919
        return base % max(1, span)

    def eval_batches(self, n_seqs, batch):
        out = []
        for i in range(max(1, math.ceil(n_seqs / batch))):
            offsets = self._heldout_offsets(batch * (i + 1), self.seq_len)[i * batch:]
            out.append(self._windows(self.heldout, offsets, self.seq_len))
        return out

    def stream_batch(self, n, segments, seg_len):
        T = segments * seg_len
        if len(self.heldout) < T + 1:
            raise TaskError(f"the held-out text ({len(self.heldout)} bytes) is shorter than the stream "
                            f"({segments} segments of {seg_len})")
        return self._windows(self.heldout, self._heldout_offsets(n, T), T)

    def describe(self):
        src = "stdlib" if not self.data else Path(self.data).name
        return f"lm ({src}, {self.info['train_bytes'] / 1e6:.1f} MB)"

    def spec(self):
        return {"task": "lm", "data": self.data, "corpus": self.info}


# ----------------------------------------------------------------------------------------------
class NIAH(Task):
    """Needle in a haystack. Vocab: 0 unused, 1 NEEDLE, 2 QUERY, then key and value ranges; the
    haystack draws from every token but the markers (keys and values appear as distractors)."""

    name = "niah"
    NEEDLE, QUERY = 1, 2

    def __init__(self, vocab, seq_len, seed, needles: int = 1):
        super().__init__(vocab, seq_len, seed)
        if vocab < 16:
            raise TaskError(f"niah needs a vocabulary of at least 16 tokens, the model has {vocab}")
        self.needles = needles
        span = (vocab - 3) // 2
        self.key_lo, self.key_hi = 3, 3 + span
        self.value_lo, self.value_hi = 3 + span, 3 + 2 * span
        if needles < 1 or needles > span:
            raise TaskError(f"niah needs between 1 and {span} needles, got {needles}")
        if seq_len < 5 * needles + 4:
            raise TaskError(f"niah with {needles} needle(s) needs --seq-len of at least {5 * needles + 4}")

    def _fill(self, g, n, T):
        """Haystack: any token but the two markers, so keys and values also occur as
        distractors and only the marker says where the needle is."""
        return torch.randint(3, self.vocab, (n, T), generator=g)

    def _needles(self, g, n):
        order = torch.rand(n, self.key_hi - self.key_lo, generator=g).argsort(1)
        keys = order[:, :self.needles] + self.key_lo
        values = torch.randint(self.value_lo, self.value_hi, (n, self.needles), generator=g)
        return keys, values

    def _place(self, g, inputs, keys, values, lo, hi):
        """Needles at random non-overlapping depths in [lo, hi) (slots of 3 tokens)."""
        n = inputs.shape[0]
        slots = (hi - lo) // 3
        pos = torch.rand(n, slots, generator=g).argsort(1)[:, :self.needles] * 3 + lo
        rows = torch.arange(n)[:, None].expand_as(pos)
        inputs[rows, pos] = self.NEEDLE
        inputs[rows, pos + 1] = keys
        inputs[rows, pos + 2] = values
        return pos

    def _ask(self, g, inputs, targets, keys, values, end):
        n = inputs.shape[0]
        order = torch.rand(n, self.needles, generator=g).argsort(1)
        k, v = keys.gather(1, order), values.gather(1, order)
        start = end - 2 * self.needles
        inputs[:, start:end:2] = self.QUERY
        inputs[:, start + 1:end:2] = k
        targets[:, start + 1:end:2] = v

    def sample(self, g, n, seq_len):
        inputs = self._fill(g, n, seq_len)
        targets = torch.full((n, seq_len), IGNORE, dtype=torch.long)
        keys, values = self._needles(g, n)
        self._place(g, inputs, keys, values, 0, seq_len - 2 * self.needles)
        self._ask(g, inputs, targets, keys, values, seq_len)
        return Batch(inputs, targets)

    def stream_batch(self, n, segments, seg_len):
        """Needles in segment 0, the query at the end of every segment."""
        g = generator(self.seed, 0, STREAM_SALT)
        T = segments * seg_len
        inputs = self._fill(g, n, T)
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        keys, values = self._needles(g, n)
        self._place(g, inputs, keys, values, 0, seg_len - 2 * self.needles)
        for s in range(segments):
            self._ask(g, inputs, targets, keys, values, (s + 1) * seg_len)
        return Batch(inputs, targets)

    def chance(self):
        return 1.0 / (self.value_hi - self.value_lo)

    def describe(self):
        return f"niah ({self.needles} needle{'s' if self.needles > 1 else ''})"

    def spec(self):
        return {"task": "niah", "needles": self.needles}


# ----------------------------------------------------------------------------------------------
DEFAULT_PHASES = "mqar:A,mqar:B,lm"


def _phase_task(text: str, vocab, seq_len, seed, pairs, needles, data) -> Task:
    name, _, arg = text.strip().partition(":")
    name = name.strip().lower()
    if name == "mqar":
        return MQAR(vocab, seq_len, seed, pairs=pairs, key_set=arg or None)
    if name == "lm":
        return LM(vocab, seq_len, seed, data=arg or data)
    if name == "niah":
        return NIAH(vocab, seq_len, seed, needles=needles)
    raise TaskError(f"unknown continual phase {text!r} (phases: mqar:A, mqar:B, mqar, lm, niah)")


class Continual(Task):
    """Phases trained one after the other; steps are split evenly between them."""

    name = "continual"

    def __init__(self, vocab, seq_len, seed, steps: int, phases: str = DEFAULT_PHASES,
                 pairs: int = 8, needles: int = 1, data: str | None = None):
        super().__init__(vocab, seq_len, seed)
        names = [p for p in phases.split(",") if p.strip()]
        if len(names) < 2:
            raise TaskError(f"continual needs at least two phases, got {phases!r}")
        self.phase_names = [p.strip() for p in names]
        # each phase draws from its own stream of seeds, so phases do not share data
        self.phases = [_phase_task(p, vocab, seq_len, seed + 1000 * (i + 1), pairs, needles, data)
                       for i, p in enumerate(self.phase_names)]
        if steps < len(self.phases):
            raise TaskError(f"continual with {len(self.phases)} phases needs at least that many --steps")
        self.steps = steps
        per = steps // len(self.phases)
        self.ends = [per * (i + 1) for i in range(len(self.phases) - 1)] + [steps]

    @property
    def metric(self):  # the first phase's metric is the one tracked across phases
        return self.phases[0].metric

    def phase_of(self, step: int) -> int:
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.phases) - 1

    def train_batch(self, step, batch):
        return self.phases[self.phase_of(step)].train_batch(step, batch)

    def eval_batches(self, n_seqs, batch):
        return self.phases[0].eval_batches(n_seqs, batch)

    def stream_batch(self, n, segments, seg_len):
        return self.phases[0].stream_batch(n, segments, seg_len)

    def chance(self):
        return self.phases[0].chance()

    def context_chance(self):
        return self.phases[0].context_chance()

    def describe(self):
        return "continual (" + " -> ".join(self.phase_names) + ")"

    def spec(self):
        return {"task": "continual", "phases": self.phase_names, "ends": self.ends}


def make_task(name: str, *, vocab: int, seq_len: int, seed: int, steps: int, pairs: int = 8,
              needles: int = 1, data: str | None = None, phases: str | None = None) -> Task:
    key = (name or "").strip().lower()
    if key == "mqar":
        return MQAR(vocab, seq_len, seed, pairs=pairs)
    if key == "lm":
        return LM(vocab, seq_len, seed, data=data)
    if key == "niah":
        return NIAH(vocab, seq_len, seed, needles=needles)
    if key == "continual":
        return Continual(vocab, seq_len, seed, steps, phases or DEFAULT_PHASES, pairs, needles, data)
    from nldsl.diagnostics import suggest

    raise TaskError(f"unknown task {name!r}; {suggest(key, TASKS, 'tasks')}")
