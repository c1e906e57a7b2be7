"""Forward+backward speed and memory of the deep-memory runtime ops, reference vs chunked.

    python benchmarks/bench_deep.py                     # all workloads, T=512
    python benchmarks/bench_deep.py --ops titans hope_memory --reps 5
    python benchmarks/bench_deep.py --threads 2 --clock wall

Shapes (issue 4): B=4, H=4, head dim 32, T=512, float32; every input and initial weight
requires grad; one measurement = forward, then backward of a random projection of the output.

Workloads:
* ``titans``: :func:`mlp_memory`, hidden 128 (expansion 4), silu, GD + momentum + retention
  gates, read running, chunk 16 (specs/titans.nl).
* ``hope_memory``: :func:`mlp_memory`, hidden 32 (expansion 1), gelu, DGD + momentum + retention,
  self-generated values, read anchor, chunk 32 (M_memory of specs/hope.nl).
* ``selfmod``: :func:`self_modifying_titans`, all of k, v, q, eta, alpha generated, hidden 32,
  chunk 32 (M_memory) / 8 (the rest), momentum, conv 4 (specs/hope.nl's Titans part).
* ``cms``: :func:`cms_chain` on d = H * 32 = 128, hidden 512, periods 16/64/256, sequential, the
  chain-output surprise propagated through the levels (specs/cms.nl).

Method. Each (workload, impl) runs in a fresh subprocess with ``--threads`` intra-op threads (1 by
default: on a shared 2-core machine this is the most repeatable setting). After one warm-up
call (whose memory is measured) it repeats the measurement ``--reps`` times (1 for a reference
projected to exceed ``--budget`` s) and keeps the best by ``--clock`` (``cpu``: the worker's CPU
time, least disturbed by other processes; ``wall``). Memory: (1) "saved MB" (chunked only): the bytes
of the distinct storages autograd saves for the backward (``saved_tensors_hooks``; deterministic, the
activations a training step must hold; torch.func, which the references use for their inner
gradients, refuses these hooks); (2) "peak MB": the highest resident set size sampled every
millisecond during the first call minus the resident size before it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

B, H, DH, T_DEFAULT = 4, 4, 32, 512
TARGET_SPEEDUP = 5.0
WORKLOADS = ["titans", "hope_memory", "selfmod", "cms"]


def make(workload: str, T: int, seed: int = 0):
    """Returns (fn(impl) -> output tensor, list of leaves)."""
    import torch
    import torch.nn.functional as F

    from nldsl.runtime.cms import cms_chain
    from nldsl.runtime.deep_memory import mlp_memory
    from nldsl.runtime.self_modifying import self_modifying_titans

    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=1.0: (sc * torch.randn(*s, generator=g)).requires_grad_()  # noqa: E731
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(B, T, H, generator=g)).requires_grad_()  # noqa: E731
    if workload in ("titans", "hope_memory"):
        hid = 4 * DH if workload == "titans" else DH
        q, v = r(B, T, H, DH), r(B, T, H, DH)
        k = F.normalize(torch.randn(B, T, H, DH, generator=g), dim=-1).requires_grad_()
        eta, alpha, beta = u(0.05, 0.3), u(0.9, 1.0), u(0.0, 0.6)
        W = [r(H, hid, DH, sc=DH ** -0.5), r(H, DH, hid, sc=hid ** -0.5)]
        kw = (dict(chunk_size=16, read="running", rule="gd", activation="silu") if workload == "titans"
              else dict(chunk_size=32, read="anchor", rule="dgd", signal="self", activation="gelu"))

        def fn(impl):
            return mlp_memory(q, k, v, eta, alpha, beta, params=W, impl=impl, **kw).o

        return fn, [q, k, v, eta, alpha, beta, *W]
    if workload == "selfmod":
        x = r(B, T, H, DH)
        p = {}
        for n in ("memory", "k", "v", "q", "eta", "alpha"):
            out = 1 if n in ("eta", "alpha") else DH
            p[n] = (r(H, DH, DH, sc=0.5 * DH ** -0.5), r(H, out, DH, sc=0.5 * DH ** -0.5))
        conv, beta = r(H, DH, 4, sc=0.5), u(0.0, 0.6)

        def fn(impl):
            return self_modifying_titans(x, params=p, chunk_size=32, gen_chunk_size=8, beta_momentum=beta,
                                         eta_max=0.05, alpha_bias=3.0, conv_weight=conv, impl=impl).o

        return fn, [x, conv, beta, *[w for ws in p.values() for w in ws]]
    if workload == "cms":
        d, hid = H * DH, 4 * H * DH
        x, delta = r(B, T, d), r(B, T, d)
        P = [[r(hid, d, sc=d ** -0.5), r(d, hid, sc=hid ** -0.5)] for _ in range(3)]

        def fn(impl):
            return cms_chain(x, P, periods=(16, 64, 256), lr=0.01, delta=delta, impl=impl).o

        return fn, [x, delta, *[w for ws in P for w in ws]]
    raise ValueError(workload)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class RssSampler:
    def __enter__(self):
        self.peak = _rss_kb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_kb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_kb())


def once(fn, impl, leaves, count_saved=False):
    import torch

    saved, seen = [0], set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)  # one storage saved twice counts once
        if key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    for t in leaves:
        t.grad = None
    w0, c0 = time.perf_counter(), time.process_time()
    if count_saved:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            o = fn(impl)
    else:
        o = fn(impl)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1))
    (o * w).sum().backward()
    return time.perf_counter() - w0, time.process_time() - c0, saved[0]


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    fn, leaves = make(args.worker, args.T)
    base = _rss_kb()
    with RssSampler() as rss:
        # torch.func (the references' inner gradients) refuses saved-tensor hooks
        wall, cpu, saved = once(fn, args.impl, leaves, count_saved=args.impl == "chunked")
    times = [(wall, cpu)]
    budget_reps = args.reps if wall * args.reps < args.budget else 1
    for _ in range(budget_reps):
        w, c, _ = once(fn, args.impl, leaves)
        times.append((w, c))
    if args.impl == "chunked":
        times = times[1:]  # the first call was the warm-up
    key = 1 if args.clock == "cpu" else 0
    best = min(times, key=lambda tc: tc[key])
    print(json.dumps({"wall": best[0], "cpu": best[1], "saved_mb": saved / 2**20 if saved else None,
                      "peak_mb": max(rss.peak - base, 0) / 1024, "reps": len(times)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", nargs="+", default=WORKLOADS, choices=WORKLOADS)
    ap.add_argument("--T", type=int, default=T_DEFAULT)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    print(f"B={B} H={H} head dim={DH} T={args.T} float32, threads={args.threads}, clock={args.clock}, "
          f"best of up to {args.reps} reps after a warm-up (torch {__import__('torch').__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    hdr = (f"{'workload':<12} {'impl':<10} {args.clock + ' ms':>10} {'wall ms':>9} {'tokens/s':>9} {'saved MB':>9} "
           f"{'peak MB':>8} {'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))
    ok = True
    for wl in args.ops:
        res = {}
        for impl in ("reference", "chunked"):
            cmd = [sys.executable, __file__, "--worker", wl, "--impl", impl, "--T", str(args.T),
                   "--reps", str(args.reps), "--budget", str(args.budget), "--threads", str(args.threads),
                   "--clock", args.clock]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{wl:<12} {impl:<10} FAILED\n{out.stderr[-2000:]}")
                ok = False
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            res[impl] = r
            t = r[args.clock]
            saved_mb = "n/a" if r["saved_mb"] is None else f"{r['saved_mb']:.1f}"
            speed = ""
            if impl == "chunked" and "reference" in res:
                s = res["reference"][args.clock] / t
                speed = f"{s:.1f}x"
                ok &= s >= TARGET_SPEEDUP
            print(f"{wl:<12} {impl:<10} {1e3 * t:>10.1f} {1e3 * r['wall']:>9.1f} {B * args.T / t:>9.0f} "
                  f"{saved_mb:>9} {r['peak_mb']:>8.1f} {speed:>8}", flush=True)
    print(f"target: chunked >= {TARGET_SPEEDUP:.0f}x its reference: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
