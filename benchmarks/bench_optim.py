"""Step time of compiled optimizers against torch.optim's own implementations.

    python benchmarks/bench_optim.py            # 12 matrices of 1024 x 4096 (50.3M parameters)
    python benchmarks/bench_optim.py --quick    # 12 matrices of 256 x 1024 (3.1M parameters)
    python benchmarks/bench_optim.py --quick --deep-only   # deep momentum vs SGD momentum only

Compares compiled Adam (specs/adam.nl) with torch.optim.Adam(foreach=True), compiled Muon
(specs/muon.nl) with torch.optim.Muon, reports M3's (specs/m3.nl) overhead over Muon, and
deep momentum's (specs/deep_momentum.nl: an MLP of hidden width 8 per coordinate, its
weights 16 numbers per parameter of state) over torch.optim.SGD with momentum.
M3 is timed over whole chunks of its slow level, so the amortised Newton-Schulz of the
slow momentum (once per chunk) is included in its mean step time. Gradients are fixed
random tensors: an optimizer step's cost does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from nldsl.codegen import compile_spec

SPECS = Path(__file__).resolve().parents[1] / "specs"


def make_params(n: int, rows: int, cols: int, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for _ in range(n):
        p = torch.nn.Parameter((torch.randn(rows, cols, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(rows, cols, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(opt, device: str, group: int, clock: str) -> float:
    """Seconds per step over ``group`` consecutive steps, by the wall clock or by this
    process's CPU time (all threads; robust when other processes share the CPU)."""
    now = CLOCKS[clock]
    sync(device)
    t0 = now()
    for _ in range(group):
        opt.step()
    sync(device)
    return (now() - t0) / group


def fmt(ts: list[float]) -> str:
    return f"min {min(ts) * 1e3:8.1f} ms  median {statistics.median(ts) * 1e3:8.1f} ms"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 matrices of 256 x 1024 instead of 1024 x 4096")
    ap.add_argument("--matrices", type=int, default=12)
    ap.add_argument("--rows", type=int)
    ap.add_argument("--cols", type=int)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per optimizer (median is shown)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--clock", choices=tuple(CLOCKS), default=None,
                    help="what to measure: process CPU time (default on CPU) or wall time (default on GPU)")
    ap.add_argument("--skip-muon", action="store_true", help="no Muon and M3 (Newton-Schulz is slow on small CPUs)")
    ap.add_argument("--skip-deep", action="store_true", help="no deep momentum")
    ap.add_argument("--deep-only", action="store_true", help="only deep momentum vs SGD with momentum")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    rows = args.rows or (256 if args.quick else 1024)
    cols = args.cols or (1024 if args.quick else 4096)
    repeats = args.repeats or (5 if args.quick else 3)
    dtype = torch.float32
    n_params = args.matrices * rows * cols
    print(f"device {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"{args.matrices} matrices of {rows} x {cols} = {n_params / 1e6:.1f}M parameters, float32")

    adam_mod, muon_mod, m3_mod, deep_mod = (compile_spec(SPECS / s) for s in
                                            ("adam.nl", "muon.nl", "m3.nl", "deep_momentum.nl"))

    def compare(title, contenders, warmup, reps, group=1):
        """Times the contenders in alternation (each on its own parameters), so load from
        other processes hits all of them alike; the minimum is the least disturbed run."""
        print(title)
        opts = []
        for label, build in contenders:
            opt = build(make_params(args.matrices, rows, cols, args.device, dtype))
            for _ in range(warmup):
                opt.step()
            opts.append((label, opt, []))
        for _ in range(reps):
            for label, opt, ts in opts:
                ts.append(timed(opt, args.device, group, clock))
        for label, _, ts in opts:
            print(f"  {label:<34} {fmt(ts)} per step")
        return [min(ts) for _, _, ts in opts], [statistics.median(ts) for _, _, ts in opts]

    if not args.deep_only:
        mins, meds = compare("Adam (lr=1e-3, betas=(0.9, 0.999)):", [
            ("torch.optim.Adam(foreach=True)", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True)),
            ("compiled Adam (specs/adam.nl)", lambda p: adam_mod.Adam(p, lr=1e-3))], 2, repeats * 3)
        print(f"  compiled / torch: {mins[1] / mins[0]:.3f} (min), {meds[1] / meds[0]:.3f} (median)")
    if not (args.skip_muon or args.deep_only):
        muon_and_m3(compare, muon_mod, m3_mod, repeats)
    if not args.skip_deep:
        mins, meds = compare("Deep momentum (an MLP per coordinate, depth 2, hidden 8) vs SGD momentum:", [
            ("torch.optim.SGD(momentum=0.9)", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, foreach=True)),
            ("compiled DeepMomentum", lambda p: deep_mod.DeepMomentum(p, lr=0.01))], 1, repeats)
        print(f"  DeepMomentum / torch.optim.SGD: {mins[1] / mins[0]:.1f} (min), {meds[1] / meds[0]:.1f} (median)")


def muon_and_m3(compare, muon_mod, m3_mod, repeats: int) -> None:
    mins, meds = compare("Muon (lr=0.02, momentum=0.95, nesterov, 5 Newton-Schulz steps in bfloat16):", [
        ("torch.optim.Muon", lambda p: torch.optim.Muon(p, lr=0.02)),
        ("compiled Muon (specs/muon.nl)", lambda p: muon_mod.Muon(p, lr=0.02))], 1, repeats)
    print(f"  compiled / torch: {mins[1] / mins[0]:.3f} (min), {meds[1] / meds[0]:.3f} (median)")
    # M3 over whole chunks of its slow level (8 steps): warm up 8 steps to start on a boundary
    mins, meds = compare("M3 (slow level every 8 steps) vs Muon, mean step over whole 8-step chunks:", [
        ("torch.optim.Muon", lambda p: torch.optim.Muon(p, lr=0.02)),
        ("compiled M3 (specs/m3.nl)", lambda p: m3_mod.M3(p, lr=0.02))], 8, max(1, repeats // 2), group=8)
    print(f"  M3 / torch.optim.Muon: {mins[1] / mins[0]:.3f} (min), {meds[1] / meds[0]:.3f} (median)")


if __name__ == "__main__":
    main()
