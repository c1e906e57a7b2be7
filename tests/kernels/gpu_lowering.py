"""Compiles every generated Triton kernel for a GPU, on a machine without one.

Triton's interpreter, which runs the kernels on a CPU in the test suite, executes their Python:
it does not apply what only the compiler checks (a tuple of dtypes in an assignment, tl.dot's
shape and type rules, the shared memory a program needs). Here every kernel launch of the
kernel tests' cases (linear rules, MLP memories, in float32 and bfloat16) and of a training
step of each shipped spec with Triton memories is replaced by a compile through Triton's whole
pipeline for the target (to PTX, then ptxas's cubin; without the launcher's hints that an
argument is divisible by 16, which only refine the code); nothing runs, so the values computed
are meaningless, only the launches matter. A kernel that needs more shared memory a block than the
target has is refused as the GPU's launcher refuses it (``OutOfResources``), so that the
runtime's retry with shallower pipelining (``nldsl.runtime._triton.launch``) is exercised too.

    python tests/kernels/gpu_lowering.py [--arch 90] [-v]      # -v: each kernel's shared memory
    python tests/kernels/gpu_lowering.py --arch 80 --cases models --specs hope

Run it without TRITON_INTERPRET (the test suite runs it in a subprocess). Exit status 1 when a
kernel fails to compile, with the compiler's message.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

import torch  # noqa: E402

_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
#: shared memory a block may use, by compute capability (the launch fails past it)
_SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class Lowering:
    """Replaces ``JITFunction.run`` (every kernel launch) by a compile for ``arch``, once per
    kernel, argument types and constexprs; ``results`` maps those to the compiled kernel's
    metadata or the compiler's error."""

    def __init__(self, arch: int, shard: tuple[int, int] = (0, 1)):
        import triton
        from triton.backends.compiler import GPUTarget

        self.triton, self.target = triton, GPUTarget("cuda", arch, 32)
        self.shared_limit = _SHARED_LIMIT.get(arch)
        self.shard = shard  # (i, n): compile only the specialisations whose key hashes to i modulo n
        self.results: dict = {}

    def __enter__(self):
        import triton.runtime.jit as jit

        import nldsl.runtime._triton as plumbing

        self._saved = [(jit.JITFunction, "run", jit.JITFunction.run),
                       (plumbing, "_check_device", plumbing._check_device)]
        lowering = self

        def run(kernel, *args, grid, warmup=False, **kwargs):
            lowering.compile(kernel, args, kwargs)

        jit.JITFunction.run = run
        plumbing._check_device = lambda *a, **k: None  # CPU tensors stand in for CUDA ones
        return self

    def __exit__(self, *exc):
        for owner, name, value in self._saved:
            setattr(owner, name, value)

    def compile(self, kernel, args, kwargs) -> None:
        from triton.compiler import ASTSource

        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        signature, constexprs = {}, {}
        for i, param in enumerate(kernel.params):
            value = args[i] if i < len(args) else kwargs.get(param.name, param.default)
            if param.is_constexpr or value is None:
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[param.name] = "i1"
            elif isinstance(value, int):
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                raise TypeError(f"{kernel.fn.__name__}: no Triton type for argument {param.name} = {value!r}")
        key = (kernel.fn.__module__, kernel.fn.__name__, tuple(signature.items()), tuple(constexprs.items()),
               tuple(options.items()))
        if key in self.results:
            if self.results[key] is not None and self.results[key].get("refused"):
                self._refuse(key)
            return
        # a retry with shallower pipelining is compiled by the shard whose refusal caused it
        if "num_stages" not in options and zlib.crc32(repr(key).encode()) % self.shard[1] != self.shard[0]:
            self.results[key] = None  # another shard's
            return
        t0 = time.perf_counter()
        try:
            compiled = self.triton.compile(ASTSource(kernel, signature, constexprs), target=self.target,
                                           options=options)
        except Exception as e:  # the compiler's errors come in several types; each is reported
            self.results[key] = {"error": f"{type(e).__name__}: {e}"}
            return
        shared = compiled.metadata.shared
        self.results[key] = {"shared": shared, "seconds": time.perf_counter() - t0}
        if self.shared_limit is not None and shared > self.shared_limit:
            self.results[key]["refused"] = True
            self._refuse(key)

    def _refuse(self, key):
        from triton.runtime.errors import OutOfResources

        raise OutOfResources(self.results[key]["shared"], self.shared_limit, "shared memory")


def linear_cases() -> None:
    """The linear kernels' test cases: forward and backward, float32 and bfloat16."""
    from kernel_cases import kernel_args, leaves, make_inputs
    from test_kernels_linear import CASES

    from nldsl.codegen.kernels import linear_kernel

    for dtype in (torch.float32, torch.bfloat16):
        for spec, B, T, H, init in CASES:
            kernel = linear_kernel(spec)
            x = leaves(make_inputs(spec, B, T, H, initial_state=init), "cpu", dtype)
            o, final = kernel(*kernel_args(x), initial_state=x["S0"], output_final_state=True)
            grads = [t for t in x.values() if t is not None and t.requires_grad]
            torch.autograd.grad(o.float().sum(), grads, allow_unused=True)
            with torch.no_grad():  # a short call without gradients: the token-by-token kernel
                kernel(*kernel_args({n: t[:, :1] if n != "S0" and t is not None else t for n, t in x.items()}),
                       initial_state=x["S0"], output_final_state=True)


def mlp_cases() -> None:
    """The fused MLP-gradient kernel's test cases, float32 and bfloat16."""
    from test_kernels_mlp import KERNEL_CASES, case_kernel

    for dtype in (torch.float32, torch.bfloat16):
        for case, (_, residual, _, objective, self_target, (K, Hd, V), L, _) in KERNEL_CASES.items():
            kernel = case_kernel(case)
            N = 3
            rows = torch.tensor([1.0, 0.0, 1.0], dtype=dtype) if residual == "rows" else None
            kernel((torch.randn(N, Hd, K, dtype=dtype), torch.randn(N, V, Hd, dtype=dtype)),
                   torch.randn(N, L, K, dtype=dtype), torch.randn(N, L, K if self_target else V, dtype=dtype),
                   torch.rand(N, L, dtype=dtype), objective=objective, self_target=self_target, residual=rows,
                   outputs=("y", "factors", "sums", "input_error"))


def model_cases(names: list[str] | None = None) -> list[str]:
    """One training step (forward with labels, backward) of every shipped spec whose memories
    have Triton kernels (of those in ``names``, if given), at the benchmark's head sizes, float32.
    Returns the specs' names."""
    from kernel_cases import model_class

    import nldsl

    lowered = []
    for path in sorted((ROOT / "specs").glob("*.nl")):
        if names is not None and path.stem not in names:
            continue
        cls = model_class(nldsl.compile(path))
        if cls is None:  # an optimizer spec
            continue
        try:
            model = cls(vocab=64, dim=128, layers=1, heads=4, impl="triton")
        except ValueError:  # no memory with a Triton kernel: refused at build time (tested elsewhere)
            continue
        ids = torch.randint(0, 64, (1, 40))
        out = model(ids, labels=ids)
        out.logits.float().sum().backward()
        lowered.append(path.stem)
    return lowered


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: Hopper, 80: Ampere)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every kernel's shared memory")
    p.add_argument("--shard", default="0/1",
                   help="I/N: compile only the I-th of N parts of the kernels (parallel runs)")
    p.add_argument("--cases", nargs="+", choices=["linear", "mlp", "models"], default=["linear", "mlp", "models"])
    p.add_argument("--specs", nargs="+", help="the shipped specs (by file stem) whose training step is compiled")
    args = p.parse_args(argv)
    shard = tuple(int(n) for n in args.shard.split("/"))
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("run without TRITON_INTERPRET: the interpreter replaces the compiler")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    from triton.runtime.errors import OutOfResources

    runs = {"linear": linear_cases, "mlp": mlp_cases, "models": lambda: model_cases(args.specs)}
    specs, refused = [], []
    with Lowering(args.arch, shard) as lowering:
        for name in args.cases:
            try:
                specs += runs[name]() or []
            except OutOfResources as e:  # refused even at the shallowest pipelining
                refused.append(f"{name} cases: {e}")
    compiled = {k: r for k, r in lowering.results.items() if r is not None}
    failed = {k: r for k, r in compiled.items() if "error" in r}
    for (module, name, signature, constexprs, options), r in compiled.items():
        if "error" in r or args.verbose:
            types = ", ".join(t for _, t in signature if t != "constexpr")
            consts = ", ".join(f"{n}={v}" for n, v in constexprs if v is not None)
            what = r["error"] if "error" in r else f"shared memory {r['shared']} B, {r['seconds']:.1f} s"
            stages = dict(options).get("num_stages")
            print(f"{name}({types}; {consts}{f'; num_stages={stages}' if stages else ''}): {what}"
                  + (" (refused: too much for the target)" if r.get("refused") else ""))
    print("\n".join(refused))
    retried = sum(1 for r in compiled.values() if r.get("refused"))
    print(f"{len(compiled)} of {len(lowering.results)} kernel specialisations (shard {args.shard}; cases "
          f"{', '.join(args.cases)}{'; a training step of ' + ', '.join(specs) if specs else ''}) compiled for "
          f"sm_{args.arch} in {time.perf_counter() - t0:.0f} s, {retried} refused for their shared memory and "
          f"launched again with shallower pipelining: {len(failed) + len(refused)} failed")
    return 1 if failed or refused else 0


if __name__ == "__main__":
    sys.exit(main())
