"""Forward+backward speed and peak memory of the nldsl.runtime ops, reference vs fast path.

    python benchmarks/bench_ops.py                  # T in {512, 2048, 8192}
    python benchmarks/bench_ops.py --quick          # T = 512 only, fewer repeats
    python benchmarks/bench_ops.py --T 2048 --ops delta_rule gated_delta_rule

Shapes: B=4, H=4, K=V=64, float32, all inputs (and the initial state) requiring grad. One
measurement = forward, then backward of a random projection of the output and the final state.

Method.
* Time: each (op, impl, T) runs in a fresh subprocess; after one warm-up call (not counted,
  except for the token-by-token reference, which has nothing to warm) it repeats the
  measurement up to ``--reps`` times within ``--budget`` seconds and reports the best, by wall
  clock or (``--clock cpu``) by the worker's CPU time, which other processes on a shared
  machine disturb less. A reference projected (from a T=256 run, scaled by (T/256)^1.25) to
  exceed the budget is skipped with a note, and references above T=4096 are not run unless
  ``--long-reference`` (their autograd graphs hold several GiB).
* Peak memory: the highest resident set size (``/proc/self/statm``, sampled every millisecond
  by a background thread) during the first forward+backward call of a fresh subprocess, minus
  the resident size just before it: what the op's forward+backward adds (activations saved for
  backward, workspaces), not torch itself. (``ru_maxrss`` cannot be used: importing torch
  already sets a higher high-water mark.)
* Machine limit: the best float32 GFLOP/s of a 2048^3 matmul and of the batched 64x64x64 matmuls
  the chunked paths are made of. "GFLOP/s" per row is the op's matmul FLOPs (an analytic count
  of the forward's products, x3 for forward+backward, see ``flops()``) over the measured time,
  and "% peak" that rate over the 2048^3 matmul rate.
* fla: if flash-linear-attention is installed, its pure-torch naive chunkwise references
  (``delta_rule_chunkwise``, ``naive_chunk_gated_delta_rule``) run on the same inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

B, H, K, V = 4, 4, 64, 64
TARGET_T = 2048
MAX_REFERENCE_T = 4096
TARGET_SPEEDUP = 40.0

OPS = ["linear_attention", "delta_rule", "gated_delta_rule", "titans_linear", "dgd", "omega_rule", "softmax_attention"]


# ----------------------------------------------------------------------------------------------
# the measured workloads
# ----------------------------------------------------------------------------------------------

def make_inputs(op: str, T: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    u = lambda: torch.rand(B, T, H, generator=g)  # noqa: E731
    gates = {
        "linear_attention": lambda: {"g": -0.1 * u()},
        "delta_rule": lambda: {"beta": u()},
        "gated_delta_rule": lambda: {"beta": u(), "g": -0.1 * u()},
        "titans_linear": lambda: {"theta": 0.5 * u(), "eta": 0.9 * u(), "alpha": 0.1 * u()},
        "dgd": lambda: {"eta": 0.2 * u(), "alpha": 0.9 + 0.1 * u()},
        "omega_rule": lambda: {"gamma": 0.2 * u(), "alpha": 0.9 + 0.1 * u()},
        "softmax_attention": lambda: {},
    }[op]()
    x = {"q": q, "k": k, "v": v, **gates}
    if op != "softmax_attention":
        x["initial_state"] = 0.1 * torch.randn(B, H, K, V, generator=g)
    for t in x.values():
        t.requires_grad_(True)
    return x


OP_KWARGS = {"omega_rule": {"window": 4}, "softmax_attention": {}}


def run_once(op: str, impl: str, x: dict, chunk_size: int | None):
    """One forward + backward. Returns (wall seconds, process CPU seconds)."""
    import torch

    import nldsl.runtime as rt

    t0, c0 = time.perf_counter(), time.process_time()
    if impl.startswith("fla"):
        o, S = _fla_call(op, x)
    else:
        kw = dict(OP_KWARGS.get(op, {}))
        if op != "softmax_attention" and chunk_size is not None:
            kw["chunk_size"] = chunk_size
        args = {n: t for n, t in x.items() if n not in ("q", "k", "v")}
        r = getattr(rt, op)(x["q"], x["k"], x["v"], **args, **kw, output_final_state=True, impl=impl)
        o = r.o
        S = r.final_state if isinstance(r.final_state, torch.Tensor) else r.final_state[0]
    loss = o.sum() + S.sum()
    loss.backward()
    return time.perf_counter() - t0, time.process_time() - c0


def _fla_call(op: str, x: dict):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "runtime"))
    from runtime_cases import load_fla_naive

    if op == "delta_rule":
        naive = load_fla_naive("delta_rule/naive.py")
        bhtd = [x[n].transpose(1, 2) for n in ("q", "k", "v", "beta")]
        o, S = naive.delta_rule_chunkwise(*bhtd, chunk_size=32)  # fla's naive form: no initial state
        return o, S
    naive = load_fla_naive("gated_delta_rule/naive.py")
    return naive.naive_chunk_gated_delta_rule(
        x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=64,
        initial_state=x["initial_state"], output_final_state=True)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class RssSampler:
    """Samples this process's resident set size every millisecond on a background thread (torch
    ops release the GIL, so it runs during them); ``peak_kb`` is the highest sample."""

    def __init__(self):
        import threading

        self.peak_kb = _rss_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, _rss_kb())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_kb())


def worker(op: str, impl: str, T: int, chunk_size: int | None, reps: int, budget: float) -> dict:
    import torch

    torch.manual_seed(0)
    if op == "softmax_attention" and impl == "reference" and 3 * B * H * T * T * 4 > 4 << 30:
        # the explicit softmax materialises [B, H, T, T] scores (and their gradients)
        return {"skipped": f"explicit scores need ~{3 * B * H * T * T * 4 / 2**30:.0f} GiB"}
    if impl == "reference" and T > MAX_REFERENCE_T and not os.environ.get("NLDSL_BENCH_LONG_REFERENCE"):
        # T tiny autograd steps keep ~T * 1 MiB of activations alive: several GiB at T=8192
        return {"skipped": f"token-by-token reference not run above T={MAX_REFERENCE_T} (--long-reference)"}
    if impl == "reference":
        # project from a short run, so a hopeless measurement is skipped, not waited for
        xs = make_inputs(op, 256)
        # superlinear: the autograd graph of T tiny steps outgrows the caches
        est = run_once(op, impl, xs, chunk_size)[0] * (T / 256) ** 1.25
        del xs
        if est > budget:
            return {"skipped": f"projected {est:.0f} s > budget {budget:.0f} s"}
    x = make_inputs(op, T)
    base = _rss_kb()
    times = []
    with RssSampler() as rss:  # the first call: warm-up for the fast paths, and the memory figure
        times.append(run_once(op, impl, x, chunk_size))
    for t in x.values():
        t.grad = None
    start = time.perf_counter()
    while len(times) < reps and time.perf_counter() - start + times[-1][0] < budget:
        times.append(run_once(op, impl, x, chunk_size))
        for t in x.values():
            t.grad = None
    if impl != "reference" and len(times) > 1:
        times = times[1:]  # drop the warm-up (a token-by-token loop has nothing to warm)
    return {"wall": min(t[0] for t in times), "cpu": min(t[1] for t in times), "n": len(times),
            "peak_mb": max(rss.peak_kb - base, 0) / 1024}


# ----------------------------------------------------------------------------------------------
# machine limit and FLOP model
# ----------------------------------------------------------------------------------------------

def machine_gflops(clock: str = "wall") -> tuple[float, float]:
    import torch

    now = time.perf_counter if clock == "wall" else time.process_time

    def best(f, flop, n=8):
        f()
        ts = []
        for _ in range(n):
            t0 = now()
            f()
            ts.append(now() - t0)
        return flop / min(ts) / 1e9

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    big = best(lambda: a @ b, 2 * 2048 ** 3)
    x, y = torch.randn(512, 64, 64), torch.randn(512, 64, 64)
    small = best(lambda: x @ y, 2 * 512 * 64 ** 3, n=20)
    return big, small


# the ops' own chunk_size when none is given (on a CPU, where this benchmark runs)
DEFAULT_CHUNK = {"delta_rule": 32, "gated_delta_rule": 32}


def flops(op: str, impl: str, T: int, C: int | None) -> float:
    """Matmul FLOPs of forward+backward (3x the forward's products), all B*H sequences.

    Reference paths: the per-token products of the recurrence (each ``[K] x [K, V]`` product or
    ``[K] x [V]`` outer product is K*V multiply-adds). Chunked paths: the batched products per
    chunk of C tokens (C x C scores, UT-transform inverse ~C^3/3 and its application, the
    state pass and the reads), as implemented.
    """
    kv = K * V
    if op == "softmax_attention":
        fwd = T * T * (K + V)  # causal half of QK^T and PV, 2 flops per multiply-add
        return 3 * fwd * B * H
    if impl == "reference":
        per_token = {"linear_attention": 2, "delta_rule": 3, "gated_delta_rule": 3, "titans_linear": 3,
                     "dgd": 4, "omega_rule": 2 * 4 + 1}[op] * kv
        return 3 * 2 * per_token * T * B * H
    C = min(C or DEFAULT_CHUNK.get(op, 64), T)
    N = -(-T // C)
    if op == "linear_attention":
        per_chunk = C * C * K + C * C * V + 2 * C * kv
    elif op in ("delta_rule", "gated_delta_rule"):
        # Q K^T and K K^T, the triangular inverse, T (V - W S) and the intra-chunk read, and
        # the state's two reads and one write
        per_chunk = 2 * C * C * K + C ** 3 / 3 + 2 * C * C * V + 3 * C * kv
    elif op == "titans_linear":
        per_chunk = 6 * C * kv + C * C * K + C * C * V + C ** 3
    else:  # dgd (1 virtual token per step) and omega (window 4, C // 4 steps per tile)
        c = 4 if op == "omega_rule" else 1
        P = C
        N = -(-T // (C // c))
        C = C // c
        per_chunk = P * P * K + P ** 3 / 3 + P * P * (V + 2 * K) + 2 * P * kv + C * kv + C * P * (K + V)
    return 3 * 2 * per_chunk * N * B * H


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------

def measure(op, impl, T, args) -> dict:
    chunk = [] if args.chunk_size is None else ["--chunk-size", str(args.chunk_size)]
    cmd = [sys.executable, __file__, "--worker", op, impl, str(T), *chunk,
           "--reps", str(args.reps), "--budget", str(args.budget)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.budget * 2 + 60)
    except subprocess.TimeoutExpired:
        return {"skipped": "timed out"}
    if out.returncode != 0:
        return {"skipped": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fla_available() -> bool:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "runtime"))
    from runtime_cases import load_fla_naive

    return load_fla_naive("delta_rule/naive.py") is not None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=None, help="sequence lengths (default 512 2048 8192)")
    p.add_argument("--quick", action="store_true", help="T=512 only, 3 repeats")
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunk size for every op (default: each op's own, 64; the delta rules' 32 on a CPU)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=60.0, help="seconds per measurement (time box)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time that the table reports: wall clock, or the worker's CPU time (steadier "
                        "on a shared machine, best with --threads 1)")
    p.add_argument("--long-reference", action="store_true",
                   help=f"also run the token-by-token references above T={MAX_REFERENCE_T} (slow, GiBs)")
    p.add_argument("--worker", nargs=3, metavar=("OP", "IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        os.environ["NLDSL_BENCH_THREADS"] = str(args.threads)
    if args.long_reference:
        os.environ["NLDSL_BENCH_LONG_REFERENCE"] = "1"
    if args.worker:
        import torch

        if os.environ.get("NLDSL_BENCH_THREADS"):
            torch.set_num_threads(int(os.environ["NLDSL_BENCH_THREADS"]))
        op, impl, T = args.worker
        print(json.dumps(worker(op, impl, int(T), args.chunk_size, args.reps, args.budget)))
        return 0

    Ts = args.T or ([512] if args.quick else [512, 2048, 8192])
    if args.quick:
        args.reps = min(args.reps, 3)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # the machine limit is measured with the same threads
    big, small = machine_gflops(args.clock)
    have_fla = fla_available()
    chunk = args.chunk_size or "each op's default (64; delta rules 32)"
    print(f"nldsl.runtime forward+backward, B={B} H={H} K=V={K} float32, chunk_size={chunk}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"machine float32 matmul: {big:.0f} GFLOP/s (2048^3), {small:.0f} GFLOP/s (512 x 64^3 batched)")
    print(f"times: best of up to {args.reps} runs, {args.clock} clock; load average at start "
          f"{os.getloadavg()[0]:.1f} (other processes on a shared machine slow every figure)")
    print(f"peak memory = highest sampled RSS during the first call minus RSS before it; "
          f"fla naive references: {'yes' if have_fla else 'not installed'}\n")
    hdr = (f"{'op':<18} {'impl':<10} {'T':>5} {args.clock + ' ms':>10} {'tokens/s':>10} {'GFLOP/s':>8} {'% peak':>7} "
           f"{'peak MB':>8} {'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))
    results = {}
    for op in args.ops:
        fast = "sdpa" if op == "softmax_attention" else "chunked"
        impls = ["reference", fast]
        if have_fla and op in ("delta_rule", "gated_delta_rule"):
            impls.append("fla-naive")
        for T in Ts:
            for impl in impls:
                r = measure(op, impl, T, args)
                results[(op, impl, T)] = r
                if "skipped" in r:
                    print(f"{op:<18} {impl:<10} {T:>5} {'skipped: ' + r['skipped']}")
                    continue
                s = r[args.clock]
                naive = impl == "fla-naive"
                gf = flops(op, "chunked" if naive else impl, T, 32 if naive else args.chunk_size) / s / 1e9
                ref = results.get((op, "reference", T), {})
                speed = f"{ref[args.clock] / s:.1f}x" if impl != "reference" and args.clock in ref else ""
                print(f"{op:<18} {impl:<10} {T:>5} {s * 1e3:>10.1f} {B * T / s:>10.0f} {gf:>8.1f} "
                      f"{100 * gf / big:>6.1f}% {r['peak_mb']:>8.0f} {speed:>8}")
            sys.stdout.flush()
    if TARGET_T in Ts:
        print(f"\ntargets at T={TARGET_T}: chunked >= {TARGET_SPEEDUP:.0f}x the token-by-token reference, "
              "and faster than fla's naive chunkwise reference")
        for op in ("delta_rule", "gated_delta_rule"):
            if op not in args.ops:
                continue
            ch, ref, fla = (results.get((op, i, TARGET_T), {}) for i in ("chunked", "reference", "fla-naive"))
            if args.clock not in ch:
                continue
            line = f"  {op:<18}"
            if args.clock in ref:
                sp = ref[args.clock] / ch[args.clock]
                line += f" speedup {sp:6.1f}x ({'met' if sp >= TARGET_SPEEDUP else 'NOT met'})"
            if args.clock in fla:
                sp = fla[args.clock] / ch[args.clock]
                line += f"; vs fla naive chunkwise {sp:.2f}x ({'met' if sp > 1 else 'NOT met'})"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
