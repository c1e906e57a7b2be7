"""Forward+backward time of nldsl's generated Triton kernels (delta rule, gated delta rule) against
flash-linear-attention's chunk kernels and torch's SDPA causal attention; and the deep-memory
kernel (the fused per-chunk gradient of a two-layer MLP memory) against its PyTorch closed form.

    python benchmarks/bench_triton.py                       # T in {2048, 8192, 32768}, bfloat16
    python benchmarks/bench_triton.py --T 8192 --dtype float32 --heads 8

On a GPU: for each T, B = max(1, --tokens // T) sequences of T tokens, H heads of size K = V
(default 16 x 128, bfloat16), every input requiring grad. Each row is the median of
``triton.testing.do_bench`` (which flushes the L2 cache between runs) over one forward, or one
forward plus the backward of a fixed random projection of the output (``torch.autograd.grad``,
so nothing accumulates). The nldsl rows are ``nldsl.runtime.delta_rule`` / ``gated_delta_rule``
with ``impl='triton'`` and fla's rows ``chunk_delta_rule`` / ``chunk_gated_delta_rule`` on the
same inputs (keys L2-normalised, beta and the log retention computed outside, chunk 64); SDPA is
``scaled_dot_product_attention(is_causal=True)`` on the same q, k, v. Peak memory is the highest
allocation during one forward+backward minus what was allocated before it. Once per T, every
delta / gated-delta row's output and gradients are compared with nldsl's chunked PyTorch path in
float64 on the same (rounded) inputs: the largest difference relative to the largest value, the
worst of the six tensors (the row's last column), so a disagreement between nldsl and fla says
which one is off. A row whose kernel refuses to run (fla refuses its gated backward on Hopper
with Triton 3.4 to 3.7.0) says why, and the others go on; ``--fla-unchecked`` turns that check of
fla's off, for its time alone (its gradients are then wrong by fla's own account, and the error
column says by how much). ``--launch CONFIG...`` adds the nldsl
rows again under other launch configurations (num_warps, num_stages per kernel), each checked
like the others, ``--block-v BV...`` with the kernels rendered for BV state columns per program,
and ``--templates DIR...`` with them rendered from another copy of ``codegen_templates/`` (an
earlier commit's, say), so that a kernel change is timed against what it changed in one process
of one lease; ``--kernels N`` prints each row's N costliest GPU kernels under it.

Deep memory (unless --no-deep; float32, Titans' memory M(x) = x + W_out silu(W_in x), K = V =
--deep-head-dim, hidden 4x, chunks of 64 tokens, B = max(1, --tokens // T), H = --heads): the
per-chunk gradient alone for every (sequence, head, chunk) row at once -- the fused kernel's
per-token factors against the PyTorch closed form (mlp_forward + mlp_backward, what
``impl='chunked'`` runs) -- and ``mlp_memory`` (momentum, retention, running reads) forward and
forward+backward with ``impl='triton'`` against ``impl='chunked'``.

Without a GPU it says so and runs the interpreter correctness check only (TRITON_INTERPRET=1,
float64, small shapes: the kernels' outputs and gradients against the chunked PyTorch path, the
linear rules and the deep memories); interpreted kernels are not timed. ``--rehearse`` runs the
GPU path's code on the CPU in the interpreter at whatever sizes are given, timing nothing and
without fla's kernels (the test suite does, so that a GPU's short lease is not spent on a crash).
"""
from __future__ import annotations

import argparse
import os
import sys


def _launch_config(text: str) -> str:
    from nldsl.runtime._triton import launch_overrides

    try:
        with launch_overrides(text):
            return text
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768], help="sequence lengths")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch: B = max(1, tokens // T)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--no-sdpa", action="store_true", help="skip softmax attention")
    p.add_argument("--launch", nargs="+", default=[], metavar="CONFIG", type=_launch_config,
                   help="nldsl rows again under each launch configuration, e.g. 'solve:w2' or '*:w4,s2' "
                        "(STAGE:OPTIONS[;...], see nldsl.runtime._triton.launch_overrides)")
    p.add_argument("--block-v", type=int, nargs="+", default=[], metavar="BV",
                   help="nldsl rows again with the kernels rendered for BV state columns per program "
                        "(LinearKernelSpec.block_v; the default is nldsl.codegen.kernels.DEFAULT_BLOCK_V)")
    p.add_argument("--templates", nargs="+", default=[], metavar="DIR",
                   help="nldsl rows again with the linear kernels rendered from DIR, another copy of "
                        "codegen_templates/ (e.g. `git archive HEAD~1 codegen_templates | tar -x -C old`, "
                        "then old/codegen_templates)")
    p.add_argument("--fla-unchecked", action="store_true",
                   help="time fla's gated rule where fla refuses it for a known miscompile (Hopper, Triton "
                        "3.4 to 3.7.0): its speed only, its gradients are wrong")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="under each linear row, the N costliest GPU kernels of one forward+backward (torch.profiler)")
    deep = p.add_mutually_exclusive_group()
    deep.add_argument("--no-deep", action="store_true", help="skip the deep-memory kernel")
    deep.add_argument("--deep-only", action="store_true", help="only the deep-memory kernel's rows")
    p.add_argument("--deep-T", type=int, nargs="+", default=[2048, 8192], help="sequence lengths of the deep rows")
    p.add_argument("--deep-head-dim", type=int, default=64, help="K = V of the deep memory (hidden 4x)")
    p.add_argument("--rehearse", action="store_true",
                   help="run the GPU path on the CPU in Triton's interpreter, untimed (for tests; use float32: "
                        "the interpreter's bfloat16 arithmetic is not the GPU's)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# without a GPU: correctness in Triton's interpreter
# ----------------------------------------------------------------------------------------------

def interpreter_check() -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
    import torch
    import torch.nn.functional as F

    import nldsl.runtime as rt

    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 45, 2, 16, 16
    x = {"q": torch.randn(B, T, H, K, generator=gen, dtype=torch.float64),
         "k": F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1),
         "v": torch.randn(B, T, H, V, generator=gen, dtype=torch.float64),
         "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "g": -0.2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "S0": torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)}
    ops = {"delta_rule": lambda x, impl: rt.delta_rule(x["q"], x["k"], x["v"], x["beta"], initial_state=x["S0"],
                                                       output_final_state=True, impl=impl, chunk_size=16),
           "gated_delta_rule": lambda x, impl: rt.gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"],
                                                                   initial_state=x["S0"], output_final_state=True,
                                                                   impl=impl, chunk_size=32)}
    worst_all = 0.0
    print(f"interpreter check: B={B} T={T} H={H} K={K} V={V} float64, triton vs chunked (outputs, final "
          "state, every gradient)")
    for name, op in ops.items():
        errs = {}
        outs = []
        for impl in ("triton", "chunked"):
            leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
            o, S = op(leaves, impl)
            names = [n for n in leaves if name == "gated_delta_rule" or n != "g"]
            grads = torch.autograd.grad(o.square().sum() + S.sum(), [leaves[n] for n in names])
            outs.append((o, S, dict(zip(names, grads))))
        (o1, s1, g1), (o2, s2, g2) = outs
        errs["o"], errs["final state"] = (o1 - o2).abs().max().item(), (s1 - s2).abs().max().item()
        errs.update({f"d{n}": (g1[n] - g2[n]).abs().max().item() for n in g1})
        worst = max(errs.values())
        worst_all = max(worst_all, worst)
        print(f"  {name:17s} largest difference {worst:.2e}  ({', '.join(f'{k} {v:.1e}' for k, v in errs.items())})")
    worst_all = max(worst_all, deep_interpreter_check())
    ok = worst_all < 1e-9
    print("PASS" if ok else "FAIL", "(float64: differences must be rounding, < 1e-9)")
    return 0 if ok else 1


def deep_interpreter_check() -> float:
    """mlp_memory and cms_chain with impl='triton' against impl='chunked' (float64): outputs,
    final states and every gradient. Returns the largest difference, relative to the largest
    value of what is compared."""
    import torch
    import torch.nn.functional as F

    from nldsl.runtime.cms import cms_chain
    from nldsl.runtime.deep_memory import mlp_memory

    gen = torch.Generator().manual_seed(0)
    B, T, H, D, Hd = 2, 21, 2, 8, 32

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": rand(B, T, H, D), "k": F.normalize(rand(B, T, H, D), dim=-1), "v": rand(B, T, H, D),
         "eta": 0.2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "alpha": 0.9 + 0.1 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
         "w_in": rand(H, Hd, D, scale=0.3), "w_out": rand(H, D, Hd, scale=0.3),
         "cms_x": rand(B, T, D), "delta": rand(B, T, D, scale=0.3),
         "cms": [rand(*shape, scale=0.3) for _ in range(2) for shape in ((Hd, D), (D, Hd))]}

    def memory(x, impl):
        o, state = mlp_memory(x["q"], x["k"], x["v"], x["eta"], x["alpha"], 0.5, params=[x["w_in"], x["w_out"]],
                              chunk_size=8, read="running", activation="silu", impl=impl, output_final_state=True)
        return o, list(state.weights)

    def chain(x, impl):
        params = [x["cms"][0:2], x["cms"][2:4]]
        o, state, _ = cms_chain(x["cms_x"], params, periods=(4, 8), lr=0.02, delta=x["delta"], impl=impl,
                                output_final_state=True)
        return o, [w for block in state.weights for w in block]

    print(f"  deep memories: B={B} T={T} H={H} K=V={D} hidden {Hd}")
    worst_all = 0.0
    for name, op, used in (("mlp_memory", memory, ("q", "k", "v", "eta", "alpha", "w_in", "w_out")),
                           ("cms_chain", chain, ("cms_x", "delta", "cms"))):
        outs = []
        for impl in ("triton", "chunked"):
            leaves = {n: [t.clone().requires_grad_() for t in x[n]] if isinstance(x[n], list)
                      else x[n].clone().requires_grad_() for n in used}
            o, states = op(leaves, impl)
            flat = [t for n in used for t in (leaves[n] if isinstance(leaves[n], list) else [leaves[n]])]
            grads = torch.autograd.grad(o.square().sum() + sum(s.sum() for s in states), flat)
            outs.append((o, states, grads))
        (o1, s1, g1), (o2, s2, g2) = outs

        errs = {"o": _relative(o1, o2), "final state": max(_relative(a, b) for a, b in zip(s1, s2)),
                "gradients": max(_relative(a, b) for a, b in zip(g1, g2))}
        worst = max(errs.values())
        worst_all = max(worst_all, worst)
        print(f"  {name:17s} largest relative difference {worst:.2e}  "
              f"({', '.join(f'{k} {v:.1e}' for k, v in errs.items())})")
    return worst_all


# ----------------------------------------------------------------------------------------------
# on a GPU: timings
# ----------------------------------------------------------------------------------------------

#: largest output error relative to the largest output, as in the kernel tests
_TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 4e-2}


def gpu_bench(args) -> int:
    import torch
    import torch.nn.functional as F

    import nldsl.runtime as rt
    from nldsl.runtime._triton import launch_overrides

    dtype = getattr(torch, args.dtype)
    device, chunk_delta_rule, chunk_gated_delta_rule = "cuda", None, None
    if args.rehearse:
        device, where = "cpu", "CPU rehearsal in Triton's interpreter (nothing timed)"

        def timer(fn):
            fn()
            return float("nan")
    else:
        from triton.testing import do_bench

        def timer(fn):
            return do_bench(fn, return_mode="median")

        where = f"{torch.cuda.get_device_name()}, median of triton.testing.do_bench"
        try:
            from fla.ops.delta_rule import chunk_delta_rule
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            if args.fla_unchecked:
                import fla.ops.common.chunk_o as fla_chunk_o

                fla_chunk_o.TRITON_ABOVE_3_7_1 = True  # the version test behind fla's refusal
                print("fla's Triton check is off (--fla-unchecked): its gated row is timed as it runs, wrong "
                      "gradients and all where that check would have refused it")
        except ImportError as e:
            print(f"flash-linear-attention not importable ({e}); its rows are skipped")
    H, D = args.heads, args.head_dim
    print(f"{where}; torch {torch.__version__}, {args.dtype}, H={H}, K=V={D}, B = max(1, {args.tokens} // T)")
    # the name column: as wide as the longest row's name (a variant's tag follows the kernel's)
    tags = [*args.launch, *(f"BV {bv}" for bv in args.block_v), *args.templates]
    width = max([34, *(len(f"nldsl gated delta (triton) [{tag}]") for tag in tags)])
    if not args.deep_only:
        header = f"{'T':>6} {'B':>3}  {'kernel':{width}s} {'fwd ms':>8} {'fwd+bwd ms':>11} {'peak MiB':>9}  error"
        print(header)
        print("-" * len(header))
    summary = []
    for T in [] if args.deep_only else args.T:
        B = max(1, args.tokens // T)
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

        q, v = rand(B, T, H, D).to(dtype), rand(B, T, H, D).to(dtype)
        k = F.normalize(rand(B, T, H, D), dim=-1).to(dtype)
        beta = torch.sigmoid(rand(B, T, H)).to(dtype)
        g = F.logsigmoid(4 + rand(B, T, H)).float()  # log retention, fla takes it in float32
        do = rand(B, T, H, D).to(dtype)
        inputs = [t.requires_grad_() for t in (q, k, v, beta, g)]
        rows, launch_of = {}, {}  # name -> forward; name -> its launch configuration (nldsl rows)
        for config in ["default", *args.launch]:
            tag = "" if config == "default" else f" [{config}]"
            rows[f"nldsl delta (triton){tag}"] = lambda: rt.delta_rule(q, k, v, beta, impl="triton").o
            rows[f"nldsl gated delta (triton){tag}"] = lambda: rt.gated_delta_rule(q, k, v, beta, g, impl="triton").o
            launch_of.update({f"nldsl delta (triton){tag}": config, f"nldsl gated delta (triton){tag}": config})
        # the kernels rendered another way: for other state columns, or from another template copy
        variants = [(f"BV {bv}", {"block_v": bv}) for bv in args.block_v]
        variants += [(templates, {"templates": templates, "variant": i}) for i, templates in enumerate(args.templates)]
        for tag, how in variants:
            delta, gated = (_rendered_with(op, decay, D, **how) for op, decay in (("delta_rule", "none"),
                                                                                ("gated_delta_rule", "tensor")))
            state = q.new_zeros(B, H, D, D, dtype=torch.float32)  # as the runtime op passes it
            rows[f"nldsl delta (triton) [{tag}]"] = lambda delta=delta, state=state: \
                delta(q, k, v, beta.float(), initial_state=state, output_final_state=True).o
            rows[f"nldsl gated delta (triton) [{tag}]"] = lambda gated=gated, state=state: \
                gated(q, k, v, beta.float(), g, initial_state=state, output_final_state=True).o
            launch_of.update({f"nldsl delta (triton) [{tag}]": "default",
                              f"nldsl gated delta (triton) [{tag}]": "default"})
        if chunk_delta_rule is not None:
            rows["fla chunk_delta_rule"] = lambda: chunk_delta_rule(q, k, v, beta)[0]
            rows["fla chunk_gated_delta_rule"] = lambda: chunk_gated_delta_rule(q, k, v, g, beta)[0]
        if not args.no_sdpa:
            qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
            rows["torch SDPA causal"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        refs = {}  # the float64 answers every linear row is checked against: output and gradients
        for rule, op, n in (("delta", rt.delta_rule, 4), ("gated", rt.gated_delta_rule, 5)):
            wide = [t.detach().double().requires_grad_() for t in (q, k, v, beta, g)[:n]]
            o = op(*wide, impl="chunked").o
            refs[rule] = [o.detach(), *torch.autograd.grad(o, wide, do.double())]
        results, errors, tol = {}, {}, _TOLERANCE[args.dtype]
        for name, forward in rows.items():
            grad_out = do.transpose(1, 2) if name.startswith("torch") else do
            used = [qt, kt, vt] if name.startswith("torch") else inputs
            config = launch_of.get(name, "default")

            def fwd(forward=forward, config=config):
                with launch_overrides(config):
                    return forward()

            def fwd_bwd(forward=forward, grad_out=grad_out, used=used, config=config):
                with launch_overrides(config):  # the backward's kernels too
                    torch.autograd.grad(forward(), used, grad_out, allow_unused=True)

            try:
                with launch_overrides(config):
                    out = forward()
                    grads = torch.autograd.grad(out, used, grad_out, allow_unused=True)
            except Exception as e:  # say why, time the others
                print(f"{T:>6} {B:>3}  {name:{width}s} failed: {str(e).strip().splitlines()[0][:150]}")
                continue
            if not name.startswith("torch"):
                ref = refs["gated" if "gated" in name else "delta"]
                errors[name] = max((_relative(a, b), label) for label, a, b in zip(_CHECKED, [out, *grads], ref))
            peak = float("nan")
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            with torch.no_grad():
                t_fwd = timer(fwd)
            t_all = timer(fwd_bwd)
            results[name] = (t_fwd, t_all)
            # the check on the row itself, so a run cut short still says whether its timings count
            err, label = errors.get(name, (None, ""))
            check = "" if err is None else f"  {err:.0e} ({label})" + ("" if err <= tol else " EXCEEDS")
            print(f"{T:>6} {B:>3}  {name:{width}s} {t_fwd:8.2f} {t_all:11.2f} {peak:9.0f}{check}")
            if args.kernels:
                print("\n".join(_kernel_breakdown(fwd_bwd, args.kernels)))
        if errors:
            summary.append(f"T={T}: output and gradients vs the float64 chunked path (largest difference / largest "
                           "value, the worst of o, dq, dk, dv, dbeta, dg): "
                           + ", ".join(f"{n} {e:.1e} ({label})" + (f" EXCEEDS {tol:g}" if not e <= tol else "")
                                       for n, (e, label) in errors.items()))
        for ours in [n for n in rows if n in launch_of and n in results]:
            theirs = "fla chunk_gated_delta_rule" if "gated" in ours else "fla chunk_delta_rule"
            if theirs in results:
                ratio = results[ours][1] / results[theirs][1]
                summary.append(f"T={T}: {ours} / {theirs} fwd+bwd = {ratio:.2f}x (target <= 1.25x)")
            if "torch SDPA causal" in results:
                ratio = results[ours][1] / results["torch SDPA causal"][1]
                summary.append(f"T={T}: {ours} / SDPA fwd+bwd = {ratio:.2f}x "
                               f"({'faster' if ratio < 1 else 'slower'} than attention)")
    if not args.no_deep:
        summary += deep_bench(args.deep_T, args.heads, args.deep_head_dim, args.tokens, device=device, timer=timer)
    print()
    print("\n".join(summary))
    return 0


def _rendered_with(op: str, decay: str, D: int, block_v: int | None = None, templates: str | None = None,
                   variant: int = 0):
    """The kernels ``impl='triton'`` runs for ``op`` (chunks of 64), rendered for ``block_v`` state
    columns, or from the templates in ``templates`` (a copy of ``codegen_templates/``; the kernels
    get a name of their own, ``variant`` telling several copies apart)."""
    from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel
    from nldsl.runtime._triton import runtime_kernel

    spec = runtime_kernel(op, "delta", lr="tensor", decay=decay, head_k=D, head_v=D, chunk_size=64).spec
    if templates is None:
        return linear_kernel(LinearKernelSpec(**{**spec, "block_v": block_v}))
    from unittest import mock

    import jinja2

    from nldsl.codegen import kernels as codegen_kernels

    shipped = codegen_kernels.environment

    def environment():
        env = shipped()
        env.loader = jinja2.FileSystemLoader(templates)
        return env

    with mock.patch.object(codegen_kernels, "environment", environment):
        return linear_kernel(LinearKernelSpec(**{**spec, "name": f"{spec['name']}_templates{variant}"}))


def deep_bench(T_list, H, D, tokens, *, device, timer) -> list[str]:
    """The deep-memory rows (see the module docstring); ``timer(fn) -> ms``. Returns summary lines."""
    import torch
    import torch.nn.functional as F

    from nldsl.codegen.kernels import MlpKernelSpec, mlp_kernel
    from nldsl.runtime.deep_memory import mlp_backward, mlp_forward, mlp_memory

    C, Hd, dtype = 64, 4 * D, torch.float32
    kernel = mlp_kernel(MlpKernelSpec(name="bench_titans", d_in=D, d_hidden=Hd, d_out=D, activation="silu",
                                      residual=True, chunk=C))
    print(f"\ndeep memory: M(x) = x + W_out silu(W_in x), K=V={D}, hidden {Hd}, L2 objective, chunks of {C}, "
          f"H={H}, float32")
    header = f"{'T':>6} {'B':>3}  {'what':44s} {'fwd ms':>8} {'fwd+bwd ms':>11}"
    print(header)
    print("-" * len(header))
    summary = []
    for T in T_list:
        B = max(1, tokens // T)
        gen = torch.Generator(device=device).manual_seed(0)

        def rand(*shape, scale=1.0):
            return scale * torch.randn(*shape, generator=gen, device=device, dtype=dtype)

        # the per-chunk gradient alone: one row per (sequence, head, chunk), each at its own anchor
        N = B * H * _cdiv(T, C)
        x, t = F.normalize(rand(N, C, D), dim=-1), rand(N, C, D)
        w_in, w_out = rand(N, Hd, D, scale=D ** -0.5), rand(N, D, Hd, scale=Hd ** -0.5)

        def fused():
            return kernel((w_in, w_out), x, t).errors

        def closed_form():  # what chunk_step runs without the kernel
            y, hs, _ = mlp_forward([w_in, w_out], x, "silu", True)
            return mlp_backward([w_in, w_out], hs, y - t, "silu")

        with torch.no_grad():
            (e1, eps1), (e2, eps2) = fused(), closed_form()
            diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                       for a, b in ((e1, e2), (eps1, eps2)))
            t_fused, t_torch = timer(fused), timer(closed_form)
        print(f"{T:>6} {B:>3}  {'per-chunk gradient, fused kernel':44s} {t_fused:8.2f} {'':>11}")
        print(f"{T:>6} {B:>3}  {'per-chunk gradient, PyTorch closed form':44s} {t_torch:8.2f} {'':>11}")
        summary.append(f"deep T={T}: per-chunk gradient ({N} rows of {C} tokens) fused / closed form = "
                       f"{t_fused / t_torch:.2f}x; errors differ by {diff:.1e} of the largest")

        # the whole memory
        q, k, v = rand(B, T, H, D), F.normalize(rand(B, T, H, D), dim=-1), rand(B, T, H, D)
        eta = torch.sigmoid(rand(B, T, H)) / C
        alpha, beta = torch.sigmoid(4 + rand(B, T, H)), torch.sigmoid(rand(B, T, H))
        params = [rand(H, Hd, D, scale=D ** -0.5), rand(H, D, Hd, scale=Hd ** -0.5)]
        leaves = [z.requires_grad_() for z in (q, k, v, eta, alpha, beta, *params)]
        grad_out = rand(B, T, H, D)
        times = {}
        for impl in ("chunked", "triton"):
            def fwd(impl=impl):
                return mlp_memory(q, k, v, eta, alpha, beta, params=params, chunk_size=C, read="running",
                                  activation="silu", impl=impl).o

            def fwd_bwd(fwd=fwd):
                torch.autograd.grad(fwd(), leaves, grad_out)

            with torch.no_grad():
                t_fwd = timer(fwd)
            t_all = timer(fwd_bwd)
            times[impl] = t_all
            print(f"{T:>6} {B:>3}  {f'mlp_memory impl={impl!r}':44s} {t_fwd:8.2f} {t_all:11.2f}")
        summary.append(f"deep T={T}: mlp_memory triton / chunked fwd+bwd = {times['triton'] / times['chunked']:.2f}x")
    return summary


#: what a linear row is checked on, in the order of (output, gradients of q, k, v, beta, g)
_CHECKED = ("o", "dq", "dk", "dv", "dbeta", "dg")


def _relative(a, b) -> float:
    """Largest difference relative to the largest value of ``b`` (0 where ``a`` is an unused input's None)."""
    if a is None:
        return 0.0
    err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return err if err == err else float("inf")  # NaN counts as the worst


def _kernel_breakdown(fn, top: int) -> list[str]:
    """The ``top`` GPU kernels of one call of ``fn`` by their summed duration (ms), each with its
    launch count: where one implementation's time goes next to another's."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    except Exception as e:  # a profiler that cannot run here costs these lines, not the benchmark
        return [f"{'':12}profile failed: {type(e).__name__}: {e}"]
    spent: dict = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            ms, n = spent.get(e.name, (0.0, 0))
            spent[e.name] = (ms + e.time_range.elapsed_us() / 1e3, n + 1)
    busy = sum(ms for ms, _ in spent.values())
    rows = [f"{'':12}{ms:7.3f} ms  {n:3d}x  {name[:70]}"
            for name, (ms, n) in sorted(spent.items(), key=lambda kv: -kv[1][0])[:top]]
    return rows + [f"{'':12}{busy:7.3f} ms  GPU busy in all ({len(spent)} distinct kernels)"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main(argv=None) -> int:
    args = parse(argv)
    if args.rehearse:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        return gpu_bench(args)
    import torch

    if not torch.cuda.is_available():
        print("bench_triton: no GPU is available, so nothing is timed (interpreted kernels are not timed); "
              "running the interpreter correctness check instead.")
        return interpreter_check()
    return gpu_bench(args)


if __name__ == "__main__":
    sys.exit(main())
