"""impl='triton' end to end: the runtime ops and compiled models equal their chunked PyTorch
path (outputs, every gradient, streams with carried state), and everything the kernels cannot
run is refused with a clear error, never replaced behind the caller's back."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'nldsl[triton]')")

from kernel_cases import (DEVICE_DTYPES, ON_GPU, assert_close, assert_pair_agrees, assert_streams,  # noqa: E402
                          model_class, model_pair)

import nldsl  # noqa: E402
import nldsl.runtime as rt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPECS = ROOT / "specs"

DGD_SPEC = """\
# a DGD memory (Hope's rule on a matrix memory): anchors every 4 tokens, gates, L2-normalised q, k
model DgdNet {
  vocab = 64
  dim = 32
  heads = 2
  layers = 1
  context = 32

  level pretrain : steps every 1
  level fast : tokens every 4 read anchor

  memory mem in fast : linear {
    objective l2
    rule dgd
    lr gate
    retention gate
    qk_norm l2
    conv 2
  }

  block = residual(rmsnorm -> mem) -> residual(rmsnorm -> swiglu)
}
"""


# whole models in bfloat16 round in every layer, not only in the kernels (tested in bfloat16 above)
MODEL_DEVICE_DTYPES = [(d, t) for d, t in DEVICE_DTYPES if t != torch.bfloat16]


@pytest.mark.parametrize("device,dtype", MODEL_DEVICE_DTYPES)
@pytest.mark.parametrize("spec", ["gated_deltanet", "linear_attention", "adatransformer", "dgd"])
def test_compiled_model_triton_equals_chunked(spec, device, dtype, tmp_path, full_float32):
    """Logits, every parameter's gradient, and a stream split into calls (the decode kernel)."""
    if spec == "dgd":
        path = tmp_path / "dgdnet.nl"
        path.write_text(DGD_SPEC)
        kw = {}
    else:
        path, kw = SPECS / f"{spec}.nl", dict(dim=32, heads=2, layers=1, vocab=64)  # other head sizes than the spec's
    chunked, triton = model_pair(model_class(nldsl.compile(path)), device, dtype, **kw)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(0)).to(device)
    ref = assert_pair_agrees(chunked, triton, ids, dtype)
    assert_streams(triton, ids, (5, 6, 17, 21), ref, dtype)


OPS = {
    "linear_attention": (lambda x, impl: rt.linear_attention(x["q"], x["k"], x["v"], g=x["g"], decay=0.9, impl=impl,
                                                             initial_state=x["S0"], output_final_state=True,
                                                             chunk_size=16)),
    "delta_rule": (lambda x, impl: rt.delta_rule(x["q"], x["k"], x["v"], x["beta"], impl=impl, initial_state=x["S0"],
                                                 output_final_state=True, chunk_size=32)),
    "gated_delta_rule": (lambda x, impl: rt.gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], impl=impl,
                                                             initial_state=x["S0"], output_final_state=True)),
    "dgd": (lambda x, impl: rt.dgd(x["q"], x["k"], x["v"], 0.3 * x["beta"], x["g"].exp(), impl=impl, chunk_size=2,
                                   read="anchor", initial_state=x["S0"], output_final_state=True)),
}


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("op", list(OPS))
def test_runtime_op_triton_equals_chunked(op, device, dtype):
    gen = torch.Generator().manual_seed(3)
    B, T, H, K, V = 2, 19, 2, 8, 6
    x = {"q": torch.randn(B, T, H, K, generator=gen), "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
         "v": torch.randn(B, T, H, V, generator=gen), "beta": torch.rand(B, T, H, generator=gen),
         "g": -0.2 * torch.rand(B, T, H, generator=gen), "S0": torch.randn(B, H, K, V, generator=gen)}
    ours = {n: t.to(device=device, dtype=dtype if n != "S0" else torch.float32 if dtype != torch.float64 else dtype)
            .requires_grad_() for n, t in x.items()}
    ref = {n: t.detach().double().requires_grad_() for n, t in ours.items()}
    a, b = OPS[op](ours, "triton"), OPS[op](ref, "chunked")
    assert_close(a.o, b.o, dtype, f"{op} o")
    fa = a.final_state if isinstance(a.final_state, torch.Tensor) else a.final_state.memory
    fb = b.final_state if isinstance(b.final_state, torch.Tensor) else b.final_state.memory
    assert_close(fa, fb, dtype, f"{op} final state")
    ga = torch.autograd.grad(a.o.double().square().sum() + fa.double().sum(), list(ours.values()), allow_unused=True)
    gb = torch.autograd.grad(b.o.square().sum() + fb.sum(), list(ref.values()), allow_unused=True)
    for name, u, w in zip(ours, ga, gb):
        assert (u is None) == (w is None), name
        if u is not None:
            assert_close(u, w, dtype, f"{op} d{name}")


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, match", [
    ("transformer", r"has no in-context memory"),
])
def test_models_without_kernels_refuse_triton(spec, match):
    cls = model_class(nldsl.compile(SPECS / f"{spec}.nl"))
    with pytest.raises(ValueError, match=match):
        cls(dim=32, heads=2, layers=1, vocab=64, impl="triton")


def test_a_memory_without_kernels_is_named_with_the_reason(tmp_path):
    spec = DGD_SPEC.replace("rule dgd", "rule gd\n    momentum gate").replace("model DgdNet", "model Momentum")
    path = tmp_path / "momentum.nl"
    path.write_text(spec)
    cls = model_class(nldsl.compile(path))
    with pytest.raises(RuntimeError, match="no Triton kernels for .*none generated"):
        cls(impl="triton")


def test_models_with_kernels_copy_and_pickle():
    import copy
    import pickle

    cls = model_class(nldsl.compile(SPECS / "deltanet.nl"))
    model = cls(dim=32, heads=2, layers=1, vocab=64, impl="triton")
    kernel = model.blocks[0].mem.kernel
    assert copy.deepcopy(model).blocks[0].mem.kernel is kernel
    again = pickle.loads(pickle.dumps(kernel))
    assert again.spec == kernel.spec


def test_unknown_model_impl():
    cls = model_class(nldsl.compile(SPECS / "deltanet.nl"))
    with pytest.raises(ValueError, match="impl must be one of 'chunked', 'triton', got 'reference'"):
        cls(dim=32, heads=2, layers=1, vocab=64, impl="reference")


def test_bad_runtime_arguments_are_refused():
    q = torch.randn(1, 20, 1, 8)
    with pytest.raises(ValueError, match=r"chunk_size in \(16, 32, 64, 128\)"):
        rt.delta_rule(q, q, q, 0.5, impl="triton", chunk_size=24)
    with pytest.raises(ValueError, match="a power of two up to 64"):
        rt.dgd(q, q, q, 0.1, 0.9, impl="triton", chunk_size=3)


def test_cpu_tensors_need_the_interpreter():
    """Kernels compiled for the GPU (not interpreted) refuse CPU tensors, naming the way out."""
    from nldsl.codegen.kernels import LinearKernelSpec, linear_kernel
    from nldsl.runtime._triton import LinearKernel

    interpreted = linear_kernel(LinearKernelSpec(name="cpu_check", rule="delta", head_k=16, head_v=16, lr="tensor"))
    compiled = LinearKernel(interpreted.spec, chunk=interpreted.chunk_op, step=interpreted.step_op, interpreted=False)
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match=r"run on CUDA tensors, got cpu tensors.*TRITON_INTERPRET=1"):
        compiled(q, q, q, torch.rand(1, 4, 1))


def test_missing_triton_is_a_clear_error(monkeypatch):
    from nldsl.runtime._triton import require_triton

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    with pytest.raises(RuntimeError, match=r"needs the triton package.*pip install 'nldsl\[triton\]'"):
        require_triton("delta_rule")


@pytest.mark.skipif(not ON_GPU, reason="torch.compile traces the kernels through wrap_triton on a GPU; the "
                                       "interpreter's kernels cannot run on its fake tensors")
def test_torch_compile_sees_through_the_ops():
    cls = model_class(nldsl.compile(SPECS / "gated_deltanet.nl"))
    torch.manual_seed(0)
    model = cls(layers=1, vocab=64, impl="triton").cuda()
    ids = torch.randint(0, 64, (2, 128), device="cuda")
    eager = model(ids).logits
    compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert_close(compiled, eager.double(), torch.float32, "compiled logits")
