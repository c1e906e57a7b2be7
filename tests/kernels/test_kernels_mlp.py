"""The fused MLP-memory kernel (codegen_templates/kernels/mlp_grad.py.j2) and impl='triton' of the
deep memories.

* The kernel's outputs against an independent answer: the per-token gradients of the inner loss
  by ``torch.func.grad`` (not the closed-form backward the chunked path uses), for every
  activation, with and without residual, hidden normalisation, each objective, self-generated
  targets, padded dims, several hidden blocks and several token tiles per chunk; its backward by
  finite differences (``gradcheck``).
* ``mlp_memory``, ``cms_chain`` and ``self_modifying_titans`` with ``impl='triton'`` equal their
  chunked PyTorch path (itself tested against the token-by-token reference in
  tests/runtime_deep/): outputs, final states and every gradient; several chunk sizes, odd
  lengths, with and without an initial state.
* Refusals: what the kernel does not cover is named, never replaced.

Without a GPU everything runs in Triton's interpreter on CPU in float64 (tests/kernels/conftest.py);
with one, the kernel-level tests run on CUDA in float32 and bfloat16 against float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'nldsl[triton]')")

from kernel_cases import (DEVICE, DEVICE_DTYPES, assert_close, assert_pair_agrees, assert_streams,  # noqa: E402
                          model_class, model_pair)

from nldsl.codegen.kernels import MlpKernelSpec, mlp_kernel  # noqa: E402
from nldsl.runtime._triton import MlpKernel  # noqa: E402
from nldsl.runtime.cms import cms_chain  # noqa: E402
from nldsl.runtime.deep_memory import mlp_memory  # noqa: E402
from nldsl.runtime.self_modifying import self_modifying_titans  # noqa: E402

F64 = torch.float64
#: the ops are compared in float64 on CPU, or in full float32 on a GPU
OP_DEVICE_DTYPES = [(d, t) for d, t in DEVICE_DTYPES if t != torch.bfloat16]


def rand(gen, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


# --------------------------------------------------------------------------------------------
# the kernel against per-token gradients by torch.func
# --------------------------------------------------------------------------------------------

ACTS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "identity": lambda h: h}


def memory_map(w_in, w_out, z, activation, hidden_norm, residual):
    """M(z) for one token (w_in [H, K], w_out [V, H], z [K]), written from the definition."""
    u = ACTS[activation](w_in @ z)
    if hidden_norm == "l2":
        u = u / torch.sqrt((u * u).sum() + 1e-12)
    y = w_out @ u
    return y + residual * z if y.shape == z.shape else y  # residual: 1, 0 or a row's 0/1 mask


def token_grads(w_in, w_out, x, t, cfg):
    """Per-token (dL/dW_in, dL/dW_out, dL/dx) of the inner loss, target held constant:
    ``[N, L, ...]`` by vmap over rows and tokens of torch.func.grad."""
    objective = cfg["objective"]

    def loss(w_in, w_out, x, t, res):
        y = memory_map(w_in, w_out, x, cfg["activation"], cfg["hidden_norm"], res)
        if objective == "l2":
            return 0.5 * ((y - t) ** 2).sum()
        if objective == "dot":
            return -(y * t).sum()
        return (y * t).sum()  # a given error t: the gradient at the output is t

    grad = torch.func.grad(loss, argnums=(0, 1, 2))
    per_token = torch.func.vmap(grad, in_dims=(None, None, 0, 0, None))
    return torch.func.vmap(per_token, in_dims=(0, 0, 0, 0, 0))(w_in, w_out, x, t, cfg["res"])


KERNEL_CASES = {
    # activation, residual, hidden_norm, objective, self_target, (K, H, V), L, chunk
    "gelu": ("gelu", True, "none", "l2", False, (8, 20, 8), 13, 16),
    "silu-l2-self-3tiles": ("silu", True, "l2", "l2", True, (8, 24, 8), 40, 16),
    "tanh-l2-dot-2blocks": ("tanh", False, "l2", "dot", False, (8, 70, 6), 5, 32),
    "relu-given": ("relu", False, "none", "given", False, (5, 16, 7), 17, 16),
    "identity-64": ("identity", True, "none", "l2", False, (16, 16, 16), 64, 64),
    "gelu-l2-residual-rows-self": ("gelu", "rows", "l2", "l2", True, (8, 16, 8), 9, 16),
    # the benchmark's Titans memory (K=V=64, hidden 256, chunks of 64): the tile size at which the
    # linear kernels' chained products were miscompiled on a GPU (run there in float32 and bfloat16)
    "silu-bench-64x256": ("silu", True, "none", "l2", False, (64, 256, 64), 70, 64),
}


def case_kernel(case: str):
    """The kernel specialised for ``KERNEL_CASES[case]``."""
    activation, residual, hidden_norm, _, _, (K, Hd, V), _, chunk = KERNEL_CASES[case]
    return mlp_kernel(MlpKernelSpec(name="mlp_check", d_in=K, d_hidden=Hd, d_out=V, activation=activation,
                                    residual=residual is not False, hidden_norm=hidden_norm, chunk=chunk))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_kernel_equals_per_token_gradients(case, device, dtype):
    activation, residual, hidden_norm, objective, self_target, (K, Hd, V), L, chunk = KERNEL_CASES[case]
    kernel = case_kernel(case)
    gen = torch.Generator().manual_seed(1)
    N = 3
    x = {"x": rand(gen, N, L, K), "t": rand(gen, N, L, K if self_target else V), "eta": torch.rand(N, L, generator=gen,
         dtype=F64), "w_in": rand(gen, N, Hd, K, scale=0.5), "w_out": rand(gen, N, V, Hd, scale=0.5)}
    rows = torch.tensor([1.0, 0.0, 1.0], dtype=F64) if residual == "rows" else None
    ours = {n: t.to(device=device, dtype=dtype) for n, t in x.items()}
    x = {n: t.to(device=device, dtype=dtype).double().cpu() for n, t in x.items()}  # the rounded inputs
    out = kernel((ours["w_in"], ours["w_out"]), ours["x"], ours["t"], ours["eta"], objective=objective,
                 self_target=self_target, residual=None if rows is None else rows.to(device, dtype),
                 outputs=("y", "factors", "sums", "input_error"))

    res = torch.full((N,), float(residual is True), dtype=F64) if rows is None else rows
    cfg = dict(activation=activation, hidden_norm=hidden_norm, objective=objective, res=res)
    one = torch.func.vmap(torch.func.vmap(lambda wi, wo, z, r: memory_map(wi, wo, z, activation, hidden_norm, r),
                                          in_dims=(None, None, 0, None)))
    y = one(x["w_in"], x["w_out"], x["x"], res)
    target = one(x["w_in"], x["w_out"], x["t"], res) if self_target else x["t"]
    g_in, g_out, g_x = token_grads(x["w_in"], x["w_out"], x["x"], target, cfg)
    eta = x["eta"][..., None, None]

    assert_close(out.y, y, dtype, "y")
    e, eps, hidden = (t.double().cpu() for t in (*out.errors, out.hidden))  # the per-token products on the CPU
    assert_close(eps, {"l2": y - target, "dot": -target, "given": target}[objective], dtype, "output error")
    assert_close(e[..., :, None] * x["x"][..., None, :], g_in, dtype, "e x^T (W_in's per-token gradient)")
    assert_close(eps[..., :, None] * hidden[..., None, :], g_out, dtype, "eps a^T (W_out's per-token gradient)")
    assert_close(out.sums[0], (eta * g_in).sum(1), dtype, "sum eta e x^T")
    assert_close(out.sums[1], (eta * g_out).sum(1), dtype, "sum eta eps a^T")
    assert_close(out.input_error, g_x, dtype, "input error")


@pytest.mark.parametrize("case", ["silu-l2-self-3tiles", "gelu-l2-residual-rows-self", "relu-given"])
def test_kernel_backward_by_finite_differences(case):
    """The op's backward (the closed form under autograd) against the kernel's own forward."""
    _, residual, _, objective, self_target, (K, Hd, V), _, _ = KERNEL_CASES[case]
    kernel = case_kernel(case)
    gen = torch.Generator().manual_seed(2)
    N, L = 2, 19
    inputs = (rand(gen, N, L, K), rand(gen, N, L, K if self_target else V), torch.rand(N, L, generator=gen, dtype=F64),
              rand(gen, N, Hd, K, scale=0.5), rand(gen, N, V, Hd, scale=0.5))
    inputs = tuple(t.to(DEVICE) for t in inputs)
    rows = torch.tensor([0.0, 1.0], dtype=F64, device=DEVICE) if residual == "rows" else None

    def outputs(x, t, eta, w_in, w_out):
        r = kernel((w_in, w_out), x, t, eta, objective=objective, self_target=self_target, residual=rows,
                   outputs=("y", "factors", "sums", "input_error"))
        return r.y, r.hidden, *r.errors, *r.sums, r.input_error

    leaves = tuple(t.requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(outputs, leaves, fast_mode=True, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# the runtime ops: impl='triton' == impl='chunked'
# --------------------------------------------------------------------------------------------

def compare(run, leaves: dict, device, dtype, what: str):
    """``run(leaves, impl) -> (output, [state tensors])`` under both impls: outputs, states, and
    the gradients of every leaf (the triton run in ``dtype`` on ``device``, chunked in float64)."""
    results = {}
    for impl, dev, dt in (("chunked", "cpu", F64), ("triton", device, dtype)):
        mine = {n: [t.to(dev, dt).requires_grad_() for t in v] if isinstance(v, list) else
                v.to(dev, dt).requires_grad_() for n, v in leaves.items()}
        out, states = run(mine, impl)
        flat = [t for v in mine.values() for t in (v if isinstance(v, list) else [v])]
        loss = (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=F64, device=dev)).square().sum() \
            + sum(s.double().sum() for s in states)
        results[impl] = (out, states, torch.autograd.grad(loss, flat, allow_unused=True))
    (o1, s1, g1), (o2, s2, g2) = results["chunked"], results["triton"]
    assert_close(o2, o1, dtype, f"{what}: output")
    for i, (a, b) in enumerate(zip(s2, s1)):
        assert_close(a, b, dtype, f"{what}: final state tensor {i}")
    names = [f"{n}[{i}]" if isinstance(v, list) else n for n, v in leaves.items()
             for i in (range(len(v)) if isinstance(v, list) else [0])]
    for name, a, b in zip(names, g2, g1):
        assert (a is None) == (b is None), f"{what}: d{name}"
        if b is not None:
            assert_close(a, b, dtype, f"{what}: d{name}")


MEMORY_CASES = {
    # chunk, T, prefix (tokens run first to make an initial state; 0 = none), mlp_memory kwargs
    "running-gd-momentum-l2norm": (4, 13, 6, dict(read="running", rule="gd", activation="silu", hidden_norm="l2")),
    "anchor-dgd-self": (16, 21, 0, dict(read="anchor", rule="dgd", signal="self", activation="gelu")),
    "odd-chunk-dot-no-residual": (3, 7, 5, dict(read="running", objective="dot", residual=False, activation="relu")),
}


@pytest.mark.parametrize("device,dtype", OP_DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_mlp_memory_triton_equals_chunked(case, device, dtype):
    C, T, prefix, kw = MEMORY_CASES[case]
    gen = torch.Generator().manual_seed(3)
    B, H, K, Hd = 2, 2, 8, 12
    residual = kw.get("residual", True)
    leaves = {"q": rand(gen, B, T, H, K), "k": F.normalize(rand(gen, B, T, H, K), dim=-1), "v": rand(gen, B, T, H, K),
              "eta": 0.05 + 0.3 * torch.rand(B, T, H, generator=gen, dtype=F64),
              "alpha": 0.85 + 0.15 * torch.rand(B, T, H, generator=gen, dtype=F64),
              "beta": 0.6 * torch.rand(B, T, H, generator=gen, dtype=F64),
              "params": [rand(gen, H, Hd, K, scale=0.3), rand(gen, H, K, Hd, scale=0.3 if residual else 0.5)]}

    def run(x, impl):
        gates = (x["eta"], x["alpha"], x["beta"] if kw.get("rule") != "dgd" else None)
        state = None
        if prefix:  # an initial state that ends inside a chunk (offset prefix % C)
            state = mlp_memory(x["q"][:, :prefix], x["k"][:, :prefix], x["v"][:, :prefix],
                               *(None if g is None else g[:, :prefix] for g in gates), params=x["params"],
                               chunk_size=C, impl=impl, output_final_state=True, **kw).final_state
        s = slice(prefix, None)
        o, final = mlp_memory(x["q"][:, s], x["k"][:, s], x["v"][:, s],
                              *(None if g is None else g[:, s] for g in gates),
                              params=x["params"], chunk_size=C, impl=impl, initial_state=state,
                              output_final_state=True, **kw)
        return o, list(final.weights) + list(final.anchor)

    compare(run, leaves, device, dtype, f"mlp_memory {case}")


CMS_CASES = {
    # variant, signal, periods, T, prefix, extra kwargs
    "sequential-chain-surprise": ("sequential", "surprise", (2, 4), 11, 3, {}),
    "nested-values-l2norm": ("nested", "values", (3, 6), 13, 0, dict(hidden_norm="l2")),
    "independent-surprise-per-level": ("independent", "surprise-levels", (4, 20), 23, 7, {}),
    "sequential-self-detach": ("sequential", "self", (5, 10), 12, 0, dict(detach=True, activation="tanh")),
    # a pre-norm: the kernel runs on the normalised input, the residual and the norm's Jacobian outside
    "sequential-chain-surprise-prenorm": ("sequential", "surprise", (2, 4), 11, 3, dict(prenorm="rms")),
    "independent-values-prenorm": ("independent", "values", (3, 6), 13, 5, dict(prenorm="rms")),
    "sequential-self-prenorm": ("sequential", "self", (5, 10), 12, 0, dict(prenorm="rms")),
    "nested-surprise-levels-prenorm-detach": ("nested", "surprise-levels", (2, 4), 9, 3,
                                              dict(prenorm="rms", detach=True)),
    # the blocks' own optimizer: momentum and weight decay at their boundaries
    "sequential-surprise-momentum-retention": ("sequential", "surprise", (2, 4), 11, 3,
                                               dict(momentum=0.9, retention=(0.95, None))),
}


@pytest.mark.parametrize("device,dtype", OP_DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CMS_CASES))
def test_cms_chain_triton_equals_chunked(case, device, dtype):
    variant, signal, periods, T, prefix, kw = CMS_CASES[case]
    gen = torch.Generator().manual_seed(4)
    B, D, Hd = 2, 8, 16
    leaves = {"x": rand(gen, B, T, D), "signal": rand(gen, B, T, D), "lr": 0.05 + 0.2 * torch.rand(B, T, generator=gen,
              dtype=F64), "agg": torch.tensor([0.7, -0.4], dtype=F64),
              "params": [rand(gen, *shape, scale=0.3) for _ in periods for shape in ((Hd, D), (D, Hd))]}

    def run(x, impl):
        params = [x["params"][2 * i:2 * i + 2] for i in range(len(periods))]
        sig = {"surprise": {"delta": x["signal"]}, "values": {"target": x["signal"]},
               "self": {"target": x["signal"]},
               "surprise-levels": {"delta": [x["signal"], -0.5 * x["signal"]]}}[signal]

        def call(sl, state):
            s = {n: v[:, sl] if isinstance(v, torch.Tensor) else [t[:, sl] for t in v] for n, v in sig.items()}
            return cms_chain(x["x"][:, sl], params, periods=periods, lr=x["lr"][:, sl], variant=variant,
                             signal=signal.split("-")[0], agg_weights=x["agg"] if variant == "independent" else None,
                             impl=impl, initial_state=state, output_final_state=True, **s, **kw)

        state = call(slice(0, prefix), None).final_state if prefix else None
        o, final, _ = call(slice(prefix, None), state)
        return o, [t for block in final.weights + final.grad_sum + (final.momentum or ()) for t in block]

    compare(run, leaves, device, dtype, f"cms_chain {case}")


@pytest.mark.parametrize("device,dtype", OP_DEVICE_DTYPES)
@pytest.mark.parametrize("prefix", [0, 5])
def test_self_modifying_titans_triton_equals_chunked(prefix, device, dtype):
    """Generated k, v, eta (M_eta padded to D outputs, without the residual: a per-row residual
    mask in the kernel), L2-normalised hidden layers, momentum, DGD, chunks of 4 and 2."""
    gen = torch.Generator().manual_seed(5)
    B, T, H, D, Hd = 1, 11, 2, 8, 8

    def mlp(d_out):
        return [rand(gen, H, Hd, D, scale=0.5), rand(gen, H, d_out, Hd, scale=0.5)]

    leaves = {"x": rand(gen, B, T, H, D), "q": rand(gen, B, T, H, D), "alpha": rand(gen, B, T, H),
              "params": mlp(D) + mlp(D) + mlp(D) + mlp(1)}

    def run(x, impl):
        p = x["params"]
        params = {"memory": p[0:2], "k": p[2:4], "v": p[4:6], "eta": p[6:8]}

        def call(sl, state):
            return self_modifying_titans(x["x"][:, sl], params=params, chunk_size=4, gen_chunk_size=2,
                                         q=x["q"][:, sl], alpha_logits=x["alpha"][:, sl], beta_momentum=0.5,
                                         hidden_norm="l2", impl=impl, initial_state=state, output_final_state=True)

        state = call(slice(0, prefix), None).final_state if prefix else None
        y, final = call(slice(prefix, None), state)
        return y, [t for n in sorted(final.weights) for t in final.weights[n]]

    compare(run, leaves, device, dtype, f"self_modifying_titans prefix {prefix}")


# --------------------------------------------------------------------------------------------
# refusals: named, never replaced
# --------------------------------------------------------------------------------------------

def test_what_the_kernel_does_not_cover_is_named():
    gen = torch.Generator().manual_seed(6)
    q = rand(gen, 1, 4, 1, 8)
    three = [rand(gen, 1, 8, 8), rand(gen, 1, 8, 8), rand(gen, 1, 8, 8)]
    with pytest.raises(ValueError, match=r"mlp_memory: impl='triton' runs two-layer MLP memories .* has 3 layers"):
        mlp_memory(q, q, q, 0.1, params=three, chunk_size=2, impl="triton")
    kernel = mlp_kernel(MlpKernelSpec(name="mlp_check", d_in=8, d_hidden=8, d_out=8, activation="gelu"))
    with pytest.raises(ValueError, match=r"does not implement this memory \(activation: kernel 'gelu', memory "
                                         r"'silu', hidden_norm: kernel 'none', memory 'l2'\)"):
        mlp_memory(q, q, q, 0.1, params=three[:2], chunk_size=2, impl="triton", kernel=kernel, activation="silu",
                   hidden_norm="l2")
    with pytest.raises(ValueError, match=r"kernel= is used with impl='triton' only"):
        cms_chain(q[:, :, 0], [three[:2]], periods=(2,), lr=0.1, delta=q[:, :, 0], kernel=kernel)
    with pytest.raises(ValueError, match=r"cms_chain: impl='triton' runs two-layer MLP memories"):
        cms_chain(q[:, :, 0], [three], periods=(2,), lr=0.1, delta=q[:, :, 0], impl="triton")


def test_bad_kernel_arguments_are_refused():
    kernel = mlp_kernel(MlpKernelSpec(name="mlp_check", d_in=8, d_hidden=8, d_out=8, residual=False))
    w = (torch.zeros(2, 8, 8, dtype=F64, device=DEVICE), torch.zeros(2, 8, 8, dtype=F64, device=DEVICE))
    x = torch.zeros(2, 3, 8, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match=r"W_out must have shape \[2, 8, 8\], got \(2, 8, 4\)"):
        kernel((w[0], w[1][..., :4]), x, x)
    with pytest.raises(ValueError, match="the gradients need target"):
        kernel(w, x)
    with pytest.raises(ValueError, match="specialised to residual=False"):
        kernel(w, x, x, residual=True)
    with pytest.raises(ValueError, match="per-row residual mask needs a kernel specialised with residual=True"):
        kernel(w, x, x, residual=torch.ones(2, dtype=F64, device=DEVICE))
    with pytest.raises(ValueError, match="outputs must be a non-empty subset"):
        kernel(w, x, x, outputs=("everything",))
    with pytest.raises(ValueError, match="MlpKernelSpec 'bad': residual=True needs d_in == d_out"):
        MlpKernelSpec(name="bad", d_in=8, d_hidden=8, d_out=4)


def test_cpu_tensors_need_the_interpreter():
    interpreted = mlp_kernel(MlpKernelSpec(name="mlp_check", d_in=8, d_hidden=8, d_out=8))
    compiled = MlpKernel(interpreted.spec, grads=interpreted.grads_op, interpreted=False)
    x = torch.zeros(1, 3, 8)
    with pytest.raises(RuntimeError, match=r"run on CUDA tensors, got cpu tensors.*TRITON_INTERPRET=1"):
        compiled((torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)), x, x)


def test_kernels_copy_pickle_and_rerender_for_other_dims():
    import copy
    import pickle

    kernel = mlp_kernel(MlpKernelSpec(name="mlp_check", d_in=8, d_hidden=8, d_out=8))
    assert copy.deepcopy(kernel) is kernel
    assert pickle.loads(pickle.dumps(kernel)) is kernel  # the same specialisation, cached
    wider = kernel.for_dims(16, 40, 16)
    assert wider.dims == (16, 40, 16) and wider.spec["activation"] == kernel.spec["activation"]


# --------------------------------------------------------------------------------------------
# the kernels file of a spec with deep memories
# --------------------------------------------------------------------------------------------

def test_deep_memories_get_a_specialised_kernel_in_the_kernels_file():
    from pathlib import Path

    from nldsl.codegen.kernels import generate_kernels
    from nldsl.spec import analyze_file

    specs = Path(__file__).resolve().parents[2] / "specs"
    titans = generate_kernels(analyze_file(specs / "titans.nl"))
    assert titans.exports == ["Titans.mem"] and titans.missing == {}
    assert titans.source == generate_kernels(analyze_file(specs / "titans.nl")).source  # deterministic
    src = titans.source
    # dim 128 / 4 heads, expansion 4, chunks of 16 tokens, silu, L2-normalised hidden, residual
    for line in ("MEM_K = tl.constexpr(32)", "MEM_H = tl.constexpr(128)", "MEM_BT = tl.constexpr(16)",
                 "return h * tl.sigmoid(h)", "inv_r = 1. / tl.sqrt(sq + 1e-12)", "y += z.to(ACC) * res"):
        assert line in src, line
    cms = generate_kernels(analyze_file(specs / "cms.nl")).source
    # the chain's blocks: dim 128 -> 512 -> 128, gelu, no hidden norm, tiles of its fastest period
    for line in ("CHAIN_H = tl.constexpr(512)", "CHAIN_BT = tl.constexpr(16)", "tl.math.erf"):
        assert line in cms, line
    assert "sq = tl.zeros" not in cms and "'HopeAttention.chain': chain," in cms


# --------------------------------------------------------------------------------------------
# compiled models: impl='triton' == impl='chunked'
# --------------------------------------------------------------------------------------------

def _model_class(spec_path):
    import nldsl

    return model_class(nldsl.compile(spec_path))


def _models(spec: str, device, dtype, **kw):
    """The same weights in a float64 chunked model and a triton one (in ``dtype``)."""
    from pathlib import Path

    return model_pair(_model_class(Path(__file__).resolve().parents[2] / "specs" / f"{spec}.nl"), device, dtype, **kw)


@pytest.mark.parametrize("device,dtype", OP_DEVICE_DTYPES)
def test_compiled_titans_triton_equals_chunked(device, dtype, full_float32):
    """Logits and every parameter's gradient (a chunk of 16 and a partial one), then a stream
    split into calls that carry the memory's state through partial chunks."""
    chunked, triton = _models("titans", device, dtype, dim=16, heads=1, layers=1, vocab=32)
    assert triton.blocks[0].mem.kernel is not None
    ids = torch.randint(0, 32, (2, 21), generator=torch.Generator().manual_seed(0)).to(device)
    ref = assert_pair_agrees(chunked, triton, ids, dtype)
    assert_streams(triton, ids, (5, 19, 21), ref, dtype)


@pytest.mark.parametrize("device,dtype", OP_DEVICE_DTYPES)
def test_compiled_cms_triton_equals_chunked(device, dtype, full_float32):
    """HopeAttention (attention + a CMS chain learning from the local surprise): logits and
    gradients, then a call with labels (the chain writes after each 16-token segment) and the
    chain's state it leaves."""
    chunked, triton = _models("cms", device, dtype, dim=16, heads=2, layers=1, vocab=32)
    ids = torch.randint(0, 32, (2, 21), generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, 32, (2, 21), generator=torch.Generator().manual_seed(1)).to(device)
    assert_pair_agrees(chunked, triton, ids, dtype)
    with torch.no_grad():
        a, b = chunked(ids, labels=labels), triton(ids, labels=labels)
    assert_close(b.logits, a.logits, dtype, "logits while learning")
    wa, wb = a.state.layers[0]["chain"].weights, b.state.layers[0]["chain"].weights
    moved = max((w - w0[0]).abs().max().item() for w, w0 in zip(wa[0], chunked.blocks[0].chain.blocks[0]))
    assert moved > 1e-6, "the fastest block did not learn: nothing exercised the kernel's gradients"
    for i, (u, v) in enumerate(zip(wb, wa)):
        for j, (x, y) in enumerate(zip(u, v)):
            assert_close(x, y, dtype, f"block {i} layer {j} after learning")


def test_a_memory_the_kernel_does_not_cover_is_named(tmp_path):
    """Hope with three-layer CMS blocks: its self-modifying memory has a kernel, its chain none,
    and the model says why instead of running the chain another way."""
    from pathlib import Path

    specs = Path(__file__).resolve().parents[2] / "specs"
    spec = (specs / "hope.nl").read_text()
    (tmp_path / "adam.nl").write_text((specs / "adam.nl").read_text())  # its include
    path = tmp_path / "hope3.nl"
    path.write_text(spec.replace("structure mlp(depth=2,", "structure mlp(depth=3,"))
    cls = _model_class(path)
    with pytest.raises(ValueError, match=r"`Hope.chain` has no Triton kernel: the MLP kernel covers two-layer MLPs; "
                                         r"its blocks have depth 3; build the model with impl='chunked'"):
        cls(dim=16, heads=2, layers=1, vocab=32, impl="triton")
