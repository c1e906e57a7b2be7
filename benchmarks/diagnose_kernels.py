"""Which generated linear-memory kernel a GPU's compiler gets wrong, and at which launch
configuration: every intermediate of the chunked forward (the chunk systems' inverses T, the
writes' factors W and U, the chunk states h, the writes x, the final state), the output and
every gradient, in the given dtype against the same kernels in a wider one on the same (rounded)
inputs (float32 without TF32 on a GPU, where float64 blocks of 128-wide heads exceed the shared
memory; float64 in the interpreter), for each launch configuration asked for.

    python benchmarks/diagnose_kernels.py                      # K=V=128, chunk 64, bfloat16
    python benchmarks/diagnose_kernels.py --configs default '*:w2' 'wu:w2,s1'

On an H200 (Triton 3.6, bfloat16, K=V=128, chunks of 64) this found the output kernel wrong at 4
warps (o off by twice its largest value, every intermediate right) and everything right at 2;
after the chunk states were stored in bfloat16 and the solve changed, every configuration it
tried (2, 4 and 8 warps for the output and gradient kernels) was right, so they launch at the
defaults again (benchmarks/README.md).

A configuration is ``default`` or ``STAGE:OPTIONS[;STAGE:OPTIONS...]`` with STAGE a kernel's
last name part (kkt, solve, wu, states, output, state_grads, chunk_grads, wy_grads) or ``*`` for
all, and OPTIONS ``wN`` (num_warps) and ``sN`` (num_stages), comma-separated
(``runtime._triton.launch_overrides``).
Each configuration runs in a process of its own (an illegal memory access ends the process's
use of the GPU) and prints the largest difference of each tensor relative to its largest value;
a kernel that is wrong shows as the first wrong column. Without a GPU it runs in Triton's
interpreter (slow: use small --T and --K, and float32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

#: the columns, in the order the kernels produce them
FORWARD = ("T", "W", "U", "h", "x", "final", "o")
BACKWARD = ("dq", "dk", "dv", "dlr", "dg", "dh0")
DEFAULT_CONFIGS = ("default", "*:w2", "*:w4", "*:w8", "output:w4", "chunk_grads:w8")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, default=128, help="head size of q, k and v")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--T", type=int, default=200, help="tokens (B=2, H=2)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="the checked kernels' inputs (float32: with TF32 products on a GPU)")
    p.add_argument("--rules", nargs="+", choices=("delta", "gated"), default=["delta", "gated"])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    p.add_argument("--timeout", type=float, default=300, help="seconds per configuration")
    p.add_argument("--jobs", type=int, default=4, help="configurations run at once")
    p.add_argument("--child", metavar="RULE CONFIG", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args, rule: str, config: str) -> dict:
    """The relative errors of one rule under one configuration (run in its own process)."""
    if not _on_gpu():
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F

    from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel
    from nldsl.runtime import _triton

    spec = LinearKernelSpec(name=f"diagnose_{rule}", rule="delta", head_k=args.K, head_v=args.K, lr="tensor",
                            decay="tensor" if rule == "gated" else "none", chunk=args.chunk)
    linear_kernel(spec)
    module = next(m for n, m in sys.modules.items() if n.startswith(f"nldsl_kernels_{spec.name}_"))
    p = spec.name
    states_of, chunk, backward = (getattr(module, f"_{p}_{part}") for part in ("states_of", "chunk", "chunk_backward"))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    B, H, K, T = 2, 2, args.K, args.T

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    dtype = getattr(torch, args.dtype)
    inputs = {"q": rand(B, T, H, K).to(dtype), "k": F.normalize(rand(B, T, H, K), dim=-1).to(dtype),
              "v": rand(B, T, H, K).to(dtype), "lr": torch.sigmoid(rand(B, T, H)).to(dtype),
              "g": F.logsigmoid(4 + rand(B, T, H)).to(dtype) if rule == "gated" else None,
              "S0": 0.1 * rand(B, H, K, K)}
    do, dfinal = rand(B, T, H, K).to(dtype), rand(B, H, K, K)

    def run(x, do, dfinal):
        order = [x[n] for n in ("q", "k", "v", "lr", "g", "S0")]
        dot = _triton.dot_precision(x["q"].dtype)
        tm, w, u, h, xs, final = states_of(*order, dot)
        o, _, inverses = chunk(*order, K ** -0.5)
        grads = backward(*order, inverses, do, dfinal, K ** -0.5)  # as the op's backward: the forward's inverses
        return dict(zip(FORWARD + BACKWARD, (tm, w, u, h, xs, final, o, *grads)))

    torch.backends.cuda.matmul.allow_tf32 = device == "cuda"  # float32 is checked with TF32 products on a GPU
    with _triton.launch_overrides(config):  # the checked run only: the reference runs as shipped
        got = run(inputs, do, dfinal)
    if device == "cuda":
        torch.cuda.synchronize()  # an illegal memory access surfaces here, in the child
    wider = torch.float32 if device == "cuda" else torch.float64
    torch.backends.cuda.matmul.allow_tf32 = False  # dot_precision: "ieee" products in float32
    ref = run({n: None if t is None else t.to(wider) for n, t in inputs.items()}, do.to(wider), dfinal.to(wider))
    errors = {}
    for name, r in ref.items():
        if r is None or r.numel() == 0:
            continue
        errors[name] = ((got[name].double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
    return errors


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_child(args, rule: str, config: str) -> tuple[dict, str | None]:
    """(errors, None), or ({}, why it failed)."""
    command = [sys.executable, __file__, "--child", rule, config, "--K", str(args.K), "--chunk", str(args.chunk),
               "--T", str(args.T), "--dtype", args.dtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {args.timeout:g}s"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {}, (done.stderr.strip().splitlines() or ["no output"])[-1][:120]
    return json.loads(lines[0][len("RESULT "):]), None


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args, *args.child)))
        return 0
    tolerance = {"bfloat16": 4e-2, "float16": 1e-2, "float32": 2e-3}[args.dtype]
    where = "GPU" if _on_gpu() else "CPU, Triton's interpreter"
    print(f"{where}; {args.dtype}, K=V={args.K}, chunk {args.chunk}, B=2, T={args.T}, H=2; largest difference "
          f"from the {'float32' if _on_gpu() else 'float64'} kernels relative to the largest value, * above "
          f"{tolerance:g}")
    columns = FORWARD + BACKWARD
    print(f"{'rule':6s} {'config':18s} " + " ".join(f"{c:>7s}" for c in columns))
    runs = [(rule, config) for rule in args.rules for config in args.configs]
    with ThreadPoolExecutor(args.jobs) as pool:  # compiling is most of a run's time, and on the CPU
        outcomes = pool.map(lambda run: _run_child(args, *run), runs)
        wrong = 0
        for (rule, config), (errors, failure) in zip(runs, outcomes):
            if failure:
                wrong += 1
                print(f"{rule:6s} {config:18s} failed: {failure}", flush=True)
                continue
            wrong += any(not e <= tolerance for e in errors.values())
            print(f"{rule:6s} {config:18s} " + " ".join(
                f"{'':>7s}" if c not in errors else f"{errors[c]:6.0e}{'*' if not errors[c] <= tolerance else ' '}"
                for c in columns), flush=True)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
