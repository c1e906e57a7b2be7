"""Training-step speed and memory of compiled model specs (issue 4's comparison).

    python benchmarks/bench_models.py                       # hope, hope-attention, titans, transformer
    python benchmarks/bench_models.py --rounds 3            # each model 3 times, in turn
    python benchmarks/bench_models.py --specs specs/hope.nl specs/gated_deltanet.nl --T 256
    python benchmarks/bench_models.py --device cuda         # where a GPU is available
    python benchmarks/bench_models.py --device cuda --impl triton   # memories through the generated kernels
    python benchmarks/bench_models.py --specs specs/hope.nl --match none --breakdown   # by submodule
    python benchmarks/bench_models.py --specs specs/hope.nl --match none --calls 25    # by runtime line

Every spec is compiled with ``nldsl.compile`` and built at vocab 256, d=128, 2 layers, 4 heads
(the issue's sizes; ``--dim`` etc. change them), then trained with torch AdamW on random tokens
at T=512, B=4, float32: one measured step = forward with labels (so surprise-driven levels such
as Hope's CMS write, as in training), cross-entropy, backward, optimizer step. Each spec runs in
a subprocess of its own with ``--threads`` intra-op threads, built and warmed up (``--warmup``
steps) before any model is timed; a measurement takes ``--reps`` means of ``--window``
consecutive steps (4; the same for every model, so that no model's best is picked from more
noise than another's) and keeps the best (``--clock cpu``: the worker's CPU time, least
disturbed by other processes on a shared machine; ``wall``). ``--rounds N`` measures every model
N times, in turn, the workers waiting between their turns, and keeps each one's best; the ratio
to the matched Transformer is printed round by round with its median (a shared machine's speed
drifts over minutes and swings for seconds: neighbours in a round are seconds apart, so their
ratio is steadier than either time). Peak memory: on CUDA ``max_memory_allocated``; on CPU the
highest resident set size sampled every millisecond during the first step minus the resident
size before it.

The steps form a stream (``--state stream``, the default): each continues the state of the
``carry`` levels the step before left (detached; the other levels start each step afresh, as
``NSAMModel.new_sequence`` does in training), so that a level slower than one call still
updates: Hope's slowest CMS level, every 2048 tokens, steps once every 4 calls of 512, and its
weights differ per sequence from then on. A window then spans whole cycles of consecutive
steps in which every carry level updates at least once (it is rounded up to one; the warm-up
takes a cycle); ``--state fresh`` measures steps from no state (the slow level never updates).

On CUDA each model also gets a line with the kernels and copies one step launches and the GPU's
busy time (torch.profiler): a step much longer than that is bound by launching work, not by the
GPU. GFLOP: one step's matrix products and attention by torch's flop formulas (counted in one
more step); GFLOP/s: those over the step time, how well a model's work fits the machine. The
last column is each model's time per token over the fastest model's.

The issue's target compares like with like: Hope (every level updating) within 3x of a
Transformer *with the same parameter count*. ``--match specs/transformer.nl`` (the default) adds
that spec deepened to the layer count whose parameter count is closest to the largest model's,
and prints every model's time over it (``--match none`` turns this off).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

DEFAULT_SPECS = ["specs/hope.nl", "specs/cms.nl", "specs/titans.nl", "specs/transformer.nl"]


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(args.spec, args, args.layers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=args.cuda_graph)
    forward = model if args.compile == "none" else torch.compile(model, mode=args.compile)
    x = torch.randint(0, args.vocab, (args.B, args.T + 1), device=device)
    inputs, labels = x[:, :-1], x[:, 1:]
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    stream = args.state == "stream"
    cycle = _cycle(model, args.T) if stream else 1
    state = None

    def step(add=None):
        """One training step; ``add(phase, seconds)`` (``--breakdown``) gets its three phases."""
        nonlocal state
        t0 = clock()
        out = forward(inputs, labels=labels, state=state)
        if stream:  # the next step continues the stream: carry levels keep their state, the rest reset
            state = model.new_sequence(model.detach_state(out.state))
        loss = F.cross_entropy(out.logits.reshape(-1, args.vocab), labels.reshape(-1))
        t1 = clock()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = clock()
        opt.step()
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()
        if add is not None:
            add("forward", t1 - t0)
            add("backward", t2 - t1)
            add("optimizer", clock() - t2)

    if args.cuda_graph:
        step = _graphed(step)
    peak = _peak_rss(step) if device.type == "cpu" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    # the warm-up (with the step above) takes a stream through a whole cycle, so that the
    # measured cycles start where every carry level has updated once (its steady state)
    for _ in range(max(args.warmup, cycle) - 1):
        step()
    # every model's rep is the mean of the same number of steps (a whole number of its cycles):
    # a best of single steps would pick from more noise than a best of a cycle's means
    window = cycle * -(-args.window // cycle)
    _say({"params": _count(model), "peak_mb": peak, "cycle": cycle, "window": window})
    # the parent's commands: "measure" (the best of --reps windows; the parent interleaves the
    # models' measurements) until "finish" (the extras, then exit)
    for command in sys.stdin:
        if command.strip() != "measure":
            break
        best = float("inf")
        for _ in range(args.reps):
            t0 = clock()
            for _ in range(window):
                step()
            best = min(best, (clock() - t0) / window)
        _say({"seconds": best})
    out = {}
    if args.breakdown:
        out["breakdown"] = _breakdown(model, step, clock, args.reps * cycle)
    if args.calls:
        out["calls"] = _calls(model, step, args.calls, device)
    if not args.cuda_graph:  # (a replay dispatches no torch calls to count)
        out["flops"] = _flops(step)
    if device.type == "cuda" and not args.cuda_graph:  # (a replay is one launch: nothing to count)
        out["gpu"] = _gpu_profile(step)
    return out


PROTOCOL = "@bench "  # marks the worker's lines to the parent (anything else it prints is ignored)


def _say(message: dict) -> None:
    print(PROTOCOL + json.dumps(message), flush=True)


def _calls(model, step, top: int, device) -> dict:
    """One step's torch calls, each timed on its own (on a GPU, to the end of its kernels) and
    charged to the line that made it: the innermost frame in the nldsl package or the model's
    generated module, else autograd (the backward of built-in ops, which has no Python line) or
    the benchmark's own code (the loss, the optimizer). Returns the ``top`` costliest rows
    ``(ms, calls, op, where)`` by line and op, and the total of all calls (ms); the native CPU
    kernels' calls (ctypes, no torch calls) are rows of their own. Under the mode,
    autograd sums the gradients a tensor receives out of place (``add``); a plain step sums them
    in place (``add_``), so those rows overstate it."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import nldsl

    ours = (str(Path(nldsl.__file__).parent) + os.sep, sys.modules[type(model).__module__].__file__)
    root = str(Path(nldsl.__file__).parent.parent) + os.sep
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent: dict = {}

    def where(frame) -> str:
        seen = []
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(ours[0]) or name == ours[1]:
                return f"{name.removeprefix(root)}:{frame.f_lineno} {frame.f_code.co_name}"
            seen.append(name)
            frame = frame.f_back
        if any(f"torch{os.sep}autograd" in n or n.endswith(f"torch{os.sep}_tensor.py") for n in seen):
            return "(autograd: backward of built-in ops)"
        return "(the benchmark: loss, optimizer)"

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sync()
            ms = (time.perf_counter() - t0) * 1e3
            key = (where(sys._getframe(1)), func.overloadpacket.__name__)
            total, n = spent.get(key, (0.0, 0))
            spent[key] = (total + ms, n + 1)
            return out

    class TimedLibrary:  # the native kernels' calls (ctypes, no torch calls), by kernel
        def __init__(self, lib, name):
            self.lib, self.name = lib, name

        def __getattr__(self, fn):
            call = getattr(self.lib, fn)

            def timed(*args):
                t0 = time.perf_counter()
                out = call(*args)
                key = (f"(native: {self.name}.c)", fn)
                total, n = spent.get(key, (0.0, 0))
                spent[key] = (total + (time.perf_counter() - t0) * 1e3, n + 1)
                return out
            timed._as_parameter_ = call  # a kernel passed to another as a pointer (ctypes.cast) runs untimed
            return timed

    from nldsl.runtime import _group_read, _mlp_write, _running_read, conv

    kernels = {_mlp_write: "_mlp_write", _group_read: "_group_read", _running_read: "_running_read",
               conv: "_conv"}  # module: its C file
    libraries = {module: module._library for module in kernels}

    def timed_library(library, name):
        return lambda dt: None if library(dt) is None else TimedLibrary(library(dt), name)

    for module, name in kernels.items():
        module._library = timed_library(libraries[module], name)
    try:
        with Timed():
            step()
    finally:
        for module, library in libraries.items():
            module._library = library
    rows = sorted(((ms, n, op, at) for (at, op), (ms, n) in spent.items()), reverse=True)
    return {"total_ms": sum(r[0] for r in rows), "rows": rows[:top]}


def _flops(step) -> float:
    """The matrix-product and attention flops of one step (forward, backward, optimizer), by
    torch's own formulas (``torch.utils.flop_counter``; attention counted whole, as there, causal
    or not). A model's flops over its step time says how well it uses the machine: at equal
    flops, a model of many tiny products (a deep memory's per-chunk steps) runs far slower than
    one of a few large ones."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    ops = torch.ops.aten
    formulas = dict(flop_registry)
    # the CPU attention kernels, which the registry lacks: the flash formulas on their shapes
    cpu_attention = getattr(ops, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        formulas.setdefault(cpu_attention, lambda q, k, v, *a, out_val=None, **kw: sdpa_flop_count(
            q.shape, k.shape, v.shape))
        formulas.setdefault(ops._scaled_dot_product_flash_attention_for_cpu_backward,
                            lambda g, q, k, v, *a, out_val=None, **kw: sdpa_backward_flop_count(
                                g.shape, q.shape, k.shape, v.shape))
    total = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            formula = formulas.get(func.overloadpacket)
            if formula is not None:
                total[0] += formula(*args, **(kwargs or {}), out_val=out)
            return out

    # the native CPU kernels' products are no torch calls: count the step as torch ops (the
    # same products), so that GFLOP stays the model's work whichever implementation runs it
    native = os.environ.get("NLDSL_NATIVE")
    os.environ["NLDSL_NATIVE"] = "0"
    try:
        with Count():
            step()
    finally:
        if native is None:
            del os.environ["NLDSL_NATIVE"]
        else:
            os.environ["NLDSL_NATIVE"] = native
    return float(total[0])


def _graphed(step):
    """``step`` (a training step on fixed tensors, no host sync) captured once into a CUDA graph,
    as PyTorch's whole-network recipe does it (warm-up on a side stream; the gradients are None
    before the capture, so that its backward allocates them in the graph's pool). Returns a step
    that replays it: the same kernels, none of the Python that launched them."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay(add=None):
        graph.replay()
        torch.cuda.synchronize()
    return replay


def _gpu_profile(step) -> str:
    """The GPU work one step launches (kernels, copies, fills) and the GPU's busy time (the sum of
    their durations): a step far longer than its busy time is bound by launching work from
    Python, not by the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    except Exception as e:  # a profiler that cannot run here costs this line, not the benchmark
        return f"profile failed: {type(e).__name__}: {e}"
    return f"{len(kernels):,} GPU kernels and copies a step, GPU busy {busy:.1f} ms"


def _breakdown(model, step, clock, reps) -> dict:
    """Mean ms per step: forward (with the loss), backward and optimizer step, and within the
    forward each layer's submodules (forward hooks) and surprise-driven writes (``learn``)."""
    spent: dict = {}

    def add(key, dt):
        spent[key] = spent.get(key, 0.0) + dt

    def timed(key, fn):
        def run(*a, **kw):
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                add(key, clock() - t0)
        return run

    starts: dict = {}
    handles, parts = [], []  # parts: the rows, in the block's order
    for i, block in enumerate(model.blocks):
        for name, sub in block.named_children():
            key = f"  layer {i} {name}"
            parts.append(key)
            handles.append(sub.register_forward_pre_hook(lambda m, a, k=key: starts.__setitem__(k, clock())))
            handles.append(sub.register_forward_hook(lambda m, a, o, k=key: add(k, clock() - starts[k])))
            if callable(getattr(sub, "learn", None)):
                parts.append(f"{key}.learn")
                sub.learn = timed(parts[-1], sub.learn)
    if callable(getattr(model, "surprise", None)):
        parts.append("  surprise")
        model.surprise = timed(parts[-1], model.surprise)
    try:
        for _ in range(reps):
            step(add)
    finally:
        for h in handles:
            h.remove()
    return {k: spent[k] / reps * 1e3 for k in ["forward", *parts, "backward", "optimizer"] if k in spent}


def _build(spec: str, args, layers: int):
    import nldsl

    mod = nldsl.compile(spec)
    cls = getattr(mod, mod.__all__[0])
    model = cls(vocab=args.vocab, dim=args.dim, layers=layers, heads=args.heads)
    if args.impl != "chunked" and model.in_context_memories():  # attention-only models have no impl
        model = cls(vocab=args.vocab, dim=args.dim, layers=layers, heads=args.heads, impl=args.impl)
    return model


def _cycle(model, T: int) -> int:
    """Calls of T tokens in which every ``carry`` level of ``model`` updates at least once: a
    level with a period longer than a call (Hope's slowest CMS level, every 2048 tokens) updates
    only in every few calls of a stream."""
    return max([1] + [-(-lv.period // T) for lv in model.levels if lv.clock == "tokens" and lv.scope == "carry"])


def _labels(specs) -> dict:
    """A row name per spec: its model's class, and the file's stem where two specs' models share
    a class (variants of one model, e.g. the specs ``nldsl ablate`` writes)."""
    import nldsl

    classes = {spec: nldsl.compile(spec).__all__[0] for spec in dict.fromkeys(specs)}
    count = Counter(classes.values())
    return {spec: f"{c} ({Path(spec).stem})" if count[c] > 1 else c for spec, c in classes.items()}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _matching_layers(spec: str, args, params: int) -> int:
    """The layer count of ``spec`` whose parameter count is closest to ``params``."""
    per_layer = [_count(_build(spec, args, n)) for n in (1, 2)]
    step, base = per_layer[1] - per_layer[0], 2 * per_layer[0] - per_layer[1]
    return max(1, round((params - base) / step))


def _peak_rss(fn) -> float:
    """Highest resident set size (MB) sampled every millisecond while ``fn`` runs, minus before."""
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    base, peak, done = rss(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    fn()
    done.set()
    th.join()
    return max(peak[0], rss()) - base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impl", default="chunked", choices=["chunked", "triton"],
                   help="the in-context memories' implementation (triton: the generated kernels, on a GPU)")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                   help="run the models through torch.compile in this mode (reduce-overhead: CUDA graphs); the "
                        "compile happens in the warm-up steps (Hope's did not finish in 25 minutes on a CPU)")
    p.add_argument("--state", default="stream", choices=["stream", "fresh"],
                   help="stream (default): every step continues the last one's carry levels, and a measured "
                        "step is the mean of a cycle of steps in which every level updates; fresh: no state")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each model's training step in a CUDA graph and time its replays (with --device "
                        "cuda --state fresh): what a step costs without launching its kernels from Python")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=int, default=4,
                   help="a rep is the mean of this many consecutive steps (rounded up to a whole cycle, "
                        "the same for every model: Hope's cycle is 4)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every model this many times, in turn (live workers); the table shows each one's "
                        "best, and the ratio to the matched model is printed round by round with its median")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each model's forward by layer and submodule, its backward and optimizer step")
    p.add_argument("--calls", type=int, default=0, metavar="N",
                   help="also time every torch call of one step and print the N costliest, by the line of the "
                        "runtime or generated module that made them (the dispatch mode costs time between calls, "
                        "not in them)")
    p.add_argument("--match", default="specs/transformer.nl",
                   help="also run this spec deepened to the largest model's parameter count ('none': off)")
    p.add_argument("--spec", help=argparse.SUPPRESS)  # worker mode
    args = p.parse_args(argv)
    if args.spec:
        _say(worker(args))
        return 0
    if args.window < 1:
        p.error("--window must be at least 1")
    if args.cuda_graph and (args.device != "cuda" or args.state != "fresh" or args.compile != "none"):
        p.error("--cuda-graph replays one captured step: it needs --device cuda and --state fresh (a replay reads "
                "the tensors the capture read, not the last step's state), and no --compile")
    if args.breakdown and args.compile != "none":
        p.error("--breakdown hooks the modules' Python forwards, which torch.compile replaces: leave --compile out")
    if args.calls and (args.compile != "none" or args.cuda_graph):
        p.error("--calls charges each torch call to the Python line that made it: leave --compile and --cuda-graph out")
    if args.breakdown and args.device == "cuda":
        p.error("--breakdown times CPU work (on a GPU its rows would time kernel launches); run it on the CPU")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("no GPU available: run without --device cuda")
            return 1
    common = [f"--{k}={getattr(args, k)}" for k in ("vocab", "dim", "heads", "T", "B", "device", "impl", "compile",
                                                       "state", "threads", "clock", "warmup", "reps",
                                                       "window")]
    common += ["--breakdown"] if args.breakdown else []
    common += [f"--calls={args.calls}"] if args.calls else []
    common += ["--cuda-graph"] if args.cuda_graph else []
    print(f"compiled models, one AdamW training step (forward with labels + backward + step), "
          f"vocab {args.vocab}, d={args.dim}, {args.layers} layers, {args.heads} heads, T={args.T}, B={args.B}, "
          f"float32, {args.device}, impl {args.impl!r}, compile {args.compile!r}, {args.threads} thread(s), "
          f"best of {args.reps} means of {args.window} steps by {args.clock} clock, "
          + ("a stream (carry levels continue from step to step)" if args.state == "stream" else "fresh state")
          + (", replays of a CUDA graph" if args.cuda_graph else "")
          + (f", best of {args.rounds} rounds" if args.rounds > 1 else ""))
    labels = _labels(args.specs + ([] if args.match == "none" else [args.match]))

    workers: dict = {}  # (spec, layers): its live worker, built and warmed up

    def start(job):
        spec, layers = job
        w = _Worker([sys.executable, __file__, f"--spec={spec}", f"--layers={layers}", *common])
        if w.ready is None:
            print(f"{spec}: failed\n{w.error()}")
        else:
            w.ready.update(spec=spec, layers=layers, label=labels[spec])
            workers[job] = w

    jobs = [(spec, args.layers) for spec in args.specs]
    for job in jobs:
        start(job)
    if not workers:
        return 1
    match = None
    if args.match != "none":
        match = (args.match, _matching_layers(args.match, args, max(w.ready["params"] for w in workers.values())))
        if match not in jobs:
            jobs.append(match)
            start(match)
    # rounds: every model's measurement in turn, the workers staying alive between them, so that
    # a drift of the machine's speed (seen: 10-30% over minutes on a shared machine, more for a
    # few seconds) meets every model alike, and a round's neighbours are seconds apart
    runs: dict = {}
    for _ in range(args.rounds):
        for job in jobs:
            w = workers.get(job)
            seconds = None if w is None else w.measure()
            if seconds is None:
                if workers.pop(job, None) is not None:
                    print(f"{job[0]}: failed\n{w.error()}")
                continue
            r = dict(w.ready, seconds=seconds, tokens_per_s=args.B * args.T / seconds)
            runs.setdefault(job, []).append(r)
            cycle = f", a cycle of {r['cycle']}" if r["cycle"] > 1 else ""
            print(f"  {r['label']} x{r['layers']}: {seconds * 1e3:.0f} ms (mean of {r['window']} steps{cycle})",
                  flush=True)
    extras = {}
    for job, w in workers.items():
        extras[job] = w.finish()
        if extras[job] is None:
            print(f"{job[0]}: failed after its measurements\n{w.error()}")
    runs = {job: [dict(r, **(extras.get(job) or {})) for r in rs] for job, rs in runs.items()}
    if not runs:
        return 1
    rows = [min(rs, key=lambda r: r["seconds"]) for rs in runs.values()]
    matched = min(runs[match], key=lambda r: r["seconds"]) if match in runs else None
    fastest = min(r["seconds"] for r in rows)
    vs = f"vs {matched['label']} x{matched['layers']}" if matched else ""
    w = max(16, 2 + max(len(r["label"]) for r in rows))
    print(f"\n{'model':<{w}}{'layers':>7}{'params':>10}{'step ms':>10}{'tokens/s':>11}{'peak MB':>9}"
          f"{'GFLOP':>8}{'GFLOP/s':>9}{'vs fastest':>12}{vs:>22}")
    print("-" * (w + (102 if matched else 80)))
    for r in rows:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        flops = r.get("flops")
        rate = ("-", "-") if flops is None else (f"{flops / 1e9:.1f}", f"{flops / 1e9 / r['seconds']:.1f}")
        line = (f"{r['label']:<{w}}{r['layers']:>7}{r['params'] / 1e6:>9.2f}M{r['seconds'] * 1e3:>10.0f}"
                f"{r['tokens_per_s']:>11,.0f}{peak:>9}{rate[0]:>8}{rate[1]:>9}{r['seconds'] / fastest:>11.1f}x")
        if matched:
            line += f"{r['seconds'] / matched['seconds']:>21.1f}x"
        print(line)
    for r in rows:
        if r.get("gpu"):
            print(f"{r['label']} x{r['layers']}: {r['gpu']}")
    for r in rows:
        if r.get("breakdown"):
            print(f"\n{r['label']} x{r['layers']}, ms per step (mean of {args.reps}; hooks add a little):")
            for key, ms in r["breakdown"].items():
                print(f"  {key:<34}{ms:>9.1f}")
    for r in rows:
        if r.get("calls"):
            calls = r["calls"]
            print(f"\n{r['label']} x{r['layers']}, the {len(calls['rows'])} costliest torch calls of a step by the "
                  f"line that made them (all calls: {calls['total_ms']:.0f} ms):")
            for ms, n, op, at in calls["rows"]:
                print(f"  {ms:>8.1f} ms {n:>7,}  {op:<24} {at}")
    if matched and args.rounds > 1:
        for job, rs in runs.items():
            if job != match:
                ratios = [r["seconds"] / m["seconds"] for r, m in zip(rs, runs[match])]
                print(f"{rs[0]['label']} x{rs[0]['layers']} / {matched['label']} x{matched['layers']}, round by round: "
                      f"{' '.join(f'{x:.1f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x)")
    return 0


class _Worker:
    """A model's worker process: built and warmed up on start (``ready``: its size, peak memory,
    cycle and window), then ``measure`` (seconds, None if it died) as often as the parent asks,
    and ``finish`` (the extras: breakdown, calls, flops). Its stderr goes to a file, read on
    failure (a pipe nobody reads could fill and stall it)."""

    def __init__(self, cmd):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self._read()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        return None

    def _ask(self, command):
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return None
        return self._read()

    def measure(self):
        got = self._ask("measure")
        return None if got is None else got["seconds"]

    def finish(self):
        out = self._ask("finish")
        self.proc.wait()
        return out

    def error(self) -> str:
        self.proc.kill()
        self.proc.wait()
        self.log.seek(0)
        return self.log.read().strip()[-2000:]


if __name__ == "__main__":
    sys.exit(main())
