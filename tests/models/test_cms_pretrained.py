"""CMS levels initialised from a pretrained MLP (paper section 7.3, ad-hoc level stacking):
the weights come from a safetensors file next to the spec, and a level with learning rate 0
is exactly that MLP, whatever it reads (paper: eta -> 0 "directly uses the pre-trained blocks")."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import nldsl

SPEC = """
model Stacked {{
  vocab = 32
  dim = 16
  heads = 2
  layers = 1
  context = 64

  level pretrain : steps every 1
  level c1 : tokens every 4
  level c2 : tokens every 8

  cms chain : sequential {{
    levels c1, c2
    structure mlp(depth=2, expansion=2, residual=true, activation=gelu)
    lr constant({lr})
    init pretrained("{file}")
  }}

  block = residual(rmsnorm -> chain)
}}
"""


def _write(tmp_path, lr=0.0, file="mlp.safetensors", shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for level in ([""] if shared else ["c1.", "c2."]):
        weights[f"{level}0"] = torch.randn(32, 16, generator=g) * 0.3   # input side [hidden, dim]
        weights[f"{level}1"] = torch.randn(16, 32, generator=g) * 0.3   # output side [dim, hidden]
    save_file(weights, str(tmp_path / "mlp.safetensors"))
    spec = tmp_path / "stacked.nl"
    spec.write_text(SPEC.format(lr=lr, file=file))
    return spec, weights


def _mlp(x, w_in, w_out):
    return x + F.gelu(x @ w_in.T) @ w_out.T


@pytest.mark.parametrize("shared", [False, True])
def test_lr0_level_is_the_pretrained_mlp(tmp_path, shared):
    spec, w = _write(tmp_path, shared=shared)
    model = nldsl.compile(spec).Stacked()
    chain = model.blocks[0].chain
    p1, p2 = ("", "") if shared else ("c1.", "c2.")
    for ws, prefix in zip(chain.blocks, (p1, p2)):
        torch.testing.assert_close(ws[0][0], w[prefix + "0"])
        torch.testing.assert_close(ws[1][0], w[prefix + "1"])
    x = torch.randn(3, 21, 16)
    ids = torch.randint(0, 32, (3, 21))
    # learning rate 0: reading after any number of (surprise-driven) writes is the static chain
    out = model(ids, labels=torch.randint(0, 32, (3, 21)))
    state = out.state.layers[0]["chain"]
    y, _ = chain(x, state)
    expect = _mlp(_mlp(x, w[p1 + "0"], w[p1 + "1"]), w[p2 + "0"], w[p2 + "1"])
    torch.testing.assert_close(y, expect)


def test_pretrained_levels_still_learn_with_a_learning_rate(tmp_path):
    spec, w = _write(tmp_path, lr=0.5)
    model = nldsl.compile(spec).Stacked()
    ids = torch.randint(0, 32, (2, 16))
    state = model(ids, labels=torch.randint(0, 32, (2, 16))).state.layers[0]["chain"]
    assert (state.weights[0][0][0] - w["c1.0"]).abs().max() > 1e-4  # c1 wrote at its boundaries


def test_bad_weights_files_get_clear_errors(tmp_path):
    spec, _ = _write(tmp_path, file="missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file 'missing.safetensors' .relative to the spec's"):
        nldsl.compile(spec).Stacked()
    spec, _ = _write(tmp_path)
    with pytest.raises(ValueError, match=r"weight c1.0 has shape \(32, 16\), the level's MLP needs \(64, 32\)"):
        nldsl.compile(spec).Stacked(dim=32)
    (tmp_path / "mlp.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        nldsl.compile(spec).Stacked()
