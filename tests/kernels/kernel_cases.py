"""Shared by the kernel tests: random inputs for a LinearKernelSpec, and the independent answer,
nldsl.runtime's chunked PyTorch path (itself tested against the token-by-token reference in
float64) with the spec's fused transforms (q/k normalisation, sigmoid, logsigmoid) applied in
plain torch.

Where a GPU is present the kernels run there in float32 and bfloat16 and are compared with the
reference in float64 on the same (rounded) inputs; without one they run in Triton's interpreter
on CPU in float64, where they must agree to rounding."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import nldsl.runtime as rt
from nldsl.codegen.kernels import LinearKernelSpec

ON_GPU = torch.cuda.is_available()
#: where the kernels run: the GPU, else the CPU under Triton's interpreter
DEVICE = "cuda" if ON_GPU else "cpu"
#: (device, dtype) the kernels are checked in
DEVICE_DTYPES = [("cuda", torch.float32), ("cuda", torch.bfloat16)] if ON_GPU else [("cpu", torch.float64)]
#: largest error allowed, relative to the largest magnitude of the reference value
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3, torch.bfloat16: 4e-2}


def make_inputs(spec: LinearKernelSpec, B: int, T: int, H: int, *, seed: int = 0,
                initial_state: bool = True) -> dict:
    """q, k, v, lr, g, S0 in float64 on CPU: the gates as the kernels take them (logits for
    ``gate``, values for ``tensor``, None when the spec bakes them in), in ranges where every
    rule stays a contraction."""
    gen = torch.Generator().manual_seed(seed)
    K, V = spec.head_k, spec.head_v

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = rand(B, T, H, K), rand(B, T, H, K), rand(B, T, H, V)
    if not spec.qk_l2norm:  # unit keys keep the delta rules stable
        k = F.normalize(k, dim=-1)
    x = {"q": q, "k": k, "v": v, "lr": None, "g": None,
         "S0": 0.5 * rand(B, H, K, V) if initial_state else None}
    u = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if spec.lr == "gate":
        x["lr"] = 2 * u - 2.5 if spec.rule == "dgd" else 3 * u - 1.5   # DGD takes small steps
    elif spec.lr == "tensor":
        x["lr"] = 0.3 * u if spec.rule == "dgd" else u
    w = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    if spec.decay == "gate":
        x["g"] = 2 + 2 * w        # logits of retentions 0.88 .. 0.98
    elif spec.decay == "tensor":
        x["g"] = -0.2 * w         # log retentions
    return x


def leaves(x: dict, device: str, dtype: torch.dtype, requires_grad: bool = True) -> dict:
    """Copies of the inputs on ``device`` (the state in float32 or wider, the rest in ``dtype``)."""
    out = {}
    for name, t in x.items():
        if t is not None:
            t = t.to(device=device, dtype=torch.promote_types(dtype, torch.float32) if name == "S0" else dtype)
            t = t.detach().requires_grad_(requires_grad)
        out[name] = t
    return out


def as_float64(x: dict) -> dict:
    return {n: None if t is None else t.detach().double().requires_grad_(t.requires_grad) for n, t in x.items()}


def kernel_args(x: dict) -> tuple:
    return x["q"], x["k"], x["v"], x["lr"], x["g"]


def reference(spec: LinearKernelSpec, x: dict, *, scale=None, initial_state="S0"):
    """``MemoryOutput`` of the runtime's chunked path for the same specialisation."""
    q, k, v = x["q"], x["k"], x["v"]
    if spec.qk_l2norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    B, T, H, _ = q.shape

    def full(value):
        return torch.full((B, T, H), value, dtype=q.dtype, device=q.device)

    lr = {"none": None, "const": full(spec.lr_value), "gate": None if x["lr"] is None else torch.sigmoid(x["lr"]),
          "tensor": x["lr"]}[spec.lr]
    g = {"none": None, "const": full(math.log(spec.decay_value)),
         "gate": None if x["g"] is None else F.logsigmoid(x["g"]), "tensor": x["g"]}[spec.decay]
    S0 = x["S0"] if initial_state == "S0" else initial_state
    common = dict(scale=scale, initial_state=S0, output_final_state=True, impl="chunked")
    if spec.rule == "hebbian":
        return rt.linear_attention(q, k, v if lr is None else v * lr.unsqueeze(-1), g=g, **common)
    if spec.rule == "delta":
        beta = 1.0 if lr is None else lr
        return rt.delta_rule(q, k, v, beta, **common) if g is None else rt.gated_delta_rule(q, k, v, beta, g, **common)
    return rt.dgd(q, k, v, 1.0 if lr is None else lr, 1.0 if g is None else g.exp(), chunk_size=spec.period,
                  read=spec.read, **common)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` (the kernels', in ``dtype``) against ``expected`` (float64)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    scale = max(expected.abs().max().item(), 1e-12)
    err = (actual - expected).abs().max().item() / scale
    assert err <= TOLERANCE[dtype], \
        f"{what}: error {err:.3g} (relative to {scale:.3g}) > {TOLERANCE[dtype]:g} in {dtype}"


def state_tensors(state) -> list[torch.Tensor]:
    """The tensors of a final state (a tensor, or a DGDState's memory and anchor)."""
    return [state] if isinstance(state, torch.Tensor) else [state.memory, state.anchor]


def model_class(mod):
    """The model class (an NSAMModel subclass) of a compiled spec's module; None for a spec
    without one (an optimizer's)."""
    from nldsl.nn.model import NSAMModel

    return next((getattr(mod, n) for n in mod.__all__
                 if isinstance(getattr(mod, n), type) and issubclass(getattr(mod, n), NSAMModel)), None)


def model_pair(cls, device, dtype, **kw):
    """The same weights (rounded to ``dtype``) in a float64 chunked model and a triton one."""
    torch.manual_seed(0)
    chunked = cls(**kw).to(device=device, dtype=torch.float64)
    triton = cls(**kw, impl="triton").to(device=device, dtype=dtype)
    triton.load_state_dict(chunked.state_dict())
    chunked.load_state_dict(triton.state_dict())
    return chunked, triton


def assert_pair_agrees(chunked, triton, ids, dtype):
    """Logits and every parameter's gradient of a :func:`model_pair`; returns the reference logits."""
    ref, out = chunked(ids).logits, triton(ids).logits
    assert_close(out, ref, dtype, "logits")
    ref.square().mean().backward()
    out.double().square().mean().backward()
    for (name, p), q in zip(chunked.named_parameters(), triton.parameters()):
        assert_close(q.grad, p.grad, dtype, f"grad of {name}")
    return ref


def assert_streams(model, ids, cuts, ref, dtype):
    """The model run over ``ids`` in calls ending at ``cuts``, carrying its state, gives ``ref``."""
    with torch.no_grad():
        state, pieces, start = None, [], 0
        for end in cuts:
            step = model(ids[:, start:end], state=state)
            state, start = step.state, end
            pieces.append(step.logits)
    assert_close(torch.cat(pieces, dim=1), ref, dtype, "streamed logits")
