"""The benchmark scripts run end to end at tiny sizes (their numbers are not checked here: the
scripts print them; this keeps them from rotting as the runtime changes)."""
from __future__ import annotations

import importlib.util
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "bench_models": (["--specs", "specs/cms.nl", "specs/transformer.nl", "--T", "64", "--B", "1", "--dim", "32",
                      "--heads", "2", "--reps", "1", "--rounds", "2", "--breakdown", "--calls", "3"],
                     ["HopeAttention", "Transformer           5", "vs Transformer x5", "layer 1 chain.learn",
                      "surprise", "backward", "the 3 costliest torch calls of a step",
                      "HopeAttention x2 / Transformer x5, round by round: ", "x (median "]),
    # a stream: Hope's slowest level (every 2048 tokens, carried) updates once in 2 calls of 1024
    "bench_models hope": (["--specs", "specs/hope.nl", "--match", "none", "--T", "1024", "--B", "1", "--dim", "16",
                           "--heads", "2", "--reps", "1", "--window", "1", "--calls", "40"],
                          ["Hope x2", "(mean of 2 steps, a cycle of 2)", "a stream (carry levels continue",
                           "(native: _mlp_write.c)"]),
    "bench_deep": (["--ops", "cms", "selfmod", "--T", "24", "--reps", "1"],
                   ["cms          chunked", "selfmod      chunked", "target: chunked >= 5x its reference"]),
    "bench_ops": (["--T", "64", "--ops", "delta_rule", "titans_linear", "--reps", "1", "--budget", "5"],
                  ["delta_rule         chunked", "titans_linear      chunked"]),
    "bench_optim": (["--quick", "--matrices", "2", "--rows", "16", "--cols", "32", "--repeats", "1"],
                    ["M3 / torch.optim.Muon", "DeepMomentum / torch.optim.SGD"]),
    "bench_triton": (["--T", "64", "--deep-T", "64"], ["PASS"]),
    # the GPU path's code, in the interpreter: a lent GPU's few minutes are not spent on a crash
    "bench_triton --rehearse": (["--rehearse", "--T", "40", "--tokens", "80", "--heads", "2", "--head-dim", "16",
                                 "--deep-T", "40", "--deep-head-dim", "8", "--dtype", "float32", "--kernels", "2",
                                 "--launch", "solve:w2", "--block-v", "16", "--templates", "codegen_templates"],
                                ["output and gradients vs the float64 chunked path", "peak MiB  error",
                                 "nldsl gated delta (triton)",
                                 "mlp_memory impl='triton'", "GPU busy in all", "nldsl delta (triton) [solve:w2]",
                                 "nldsl gated delta (triton) [BV 16]",
                                 "nldsl gated delta (triton) [codegen_templates]"]),
    # the deep rows alone (gpu_checks.sh runs them as a step of their own)
    "bench_triton --rehearse --deep-only": (["--rehearse", "--deep-only", "--heads", "2", "--tokens", "80",
                                             "--deep-T", "40", "--deep-head-dim", "8", "--dtype", "float32"],
                                            ["mlp_memory impl='triton'"]),
    # one stage's launch options changed: every intermediate still matches float64
    "diagnose_kernels": (["--K", "16", "--chunk", "16", "--T", "40", "--dtype", "float32", "--rules", "delta",
                          "--configs", "default", "wu:w2,s1", "--jobs", "2"],
                         ["delta  default", "delta  wu:w2,s1"]),
}
#: what a run must not print (besides EXCEEDS, a kernel off its float64 answer)
ABSENT = {"bench_triton --rehearse --deep-only": ["nldsl delta"], "diagnose_kernels": ["failed:"],
          "bench_models": [": failed"], "bench_models hope": [": failed"]}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_benchmark_script_runs(run):
    args, expected = RUNS[run]
    script = run.split()[0]
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    for line in expected:
        assert line in p.stdout, (line, p.stdout[-3000:])
    for line in ["EXCEEDS", *ABSENT.get(run, [])]:
        assert line not in p.stdout, (line, p.stdout[-3000:])


def _bench_models():
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks" / "bench_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_triton_renders_rows_from_another_copy_of_the_templates(tmp_path):
    """--templates DIR: the linear kernels rendered from DIR (a kernel change timed against the
    copy it changed), under a name of their own beside the shipped ones."""
    pytest.importorskip("triton")
    shutil.copytree(ROOT / "codegen_templates", tmp_path / "before")
    template = tmp_path / "before" / "kernels" / "linear_memory.py.j2"
    template.write_text(template.read_text().replace("# ---- {{ title }}", "# the copy under test\n# ---- {{ title }}"))
    spec = importlib.util.spec_from_file_location("bench_triton", ROOT / "benchmarks" / "bench_triton.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    variant = bench._rendered_with("delta_rule", "none", 16, templates=str(tmp_path / "before"), variant=7)
    shipped = bench._rendered_with("delta_rule", "none", 16)
    sources = {name: inspect.getsource(module) for name, module in sys.modules.items()
               if name.startswith("nldsl_kernels_delta_rule")}
    (copy,) = [src for name, src in sources.items() if name.startswith("nldsl_kernels_delta_rule_templates7_")]
    assert "# the copy under test" in copy
    assert variant is not shipped and variant.spec["name"] == "delta_rule_templates7"
    assert not any("# the copy under test" in src for name, src in sources.items() if "templates7" not in name)


def test_model_rows_of_one_class_carry_the_file_stem(tmp_path):
    """Variants of one model (an ablation's spec, an edited copy) get told apart in the tables."""
    bench = _bench_models()
    for name in ("transformer.nl", "adam.nl"):
        shutil.copy(ROOT / "specs" / name, tmp_path / name)
    variant = tmp_path / "transformer_variant.nl"
    (tmp_path / "transformer.nl").rename(variant)
    labels = bench._labels([str(ROOT / "specs" / "transformer.nl"), str(variant), str(ROOT / "specs" / "titans.nl")])
    assert list(labels.values()) == ["Transformer (transformer)", "Transformer (transformer_variant)", "Titans"]


def test_calls_are_charged_to_the_lines_that_make_them():
    """--calls: every torch call of a step lands in one row, under the runtime or generated line
    that made it, autograd's built-in backward, or the benchmark's own loss and optimizer."""
    import torch
    import torch.nn.functional as F

    import nldsl

    bench = _bench_models()
    mod = nldsl.compile(str(ROOT / "specs" / "deltanet.nl"))
    model = getattr(mod, mod.__all__[0])(vocab=32, dim=16, layers=1, heads=2)
    opt = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 32, (1, 9))

    def step():
        loss = F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()

    calls = bench._calls(model, step, 10_000, torch.device("cpu"))
    where = {at for _, _, _, at in calls["rows"]}
    assert "nldsl/runtime/conv.py:" in " ".join(where)                      # a runtime op's line
    assert any(at.startswith(mod.__file__ + ":") for at in where)          # the generated module's
    assert {"(autograd: backward of built-in ops)", "(the benchmark: loss, optimizer)"} <= where
    assert calls["total_ms"] == pytest.approx(sum(r[0] for r in calls["rows"]))
    assert all(n > 0 for _, n, _, _ in calls["rows"])


def test_gpu_checks_runs_every_step_in_its_order(tmp_path):
    """benchmarks/gpu_checks.sh (a lent GPU's few minutes) runs, without a GPU, with a stand-in
    python that records its commands: every step of its list runs once, in the list's order,
    and each names a script that exists."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n')
    stub.chmod(0o755)
    calls = tmp_path / "calls"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(stub), "CALLS": str(calls)}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh"), str(tmp_path / "logs")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = (ROOT / "benchmarks" / "gpu_checks.sh").read_text()
    listed = text.split('all="', 1)[1].split('"', 1)[0].split()
    ran = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("=== ") and "(limit" in line]
    assert ran == ["env", *listed]
    words = [line.split() for line in calls.read_text().splitlines()]
    scripts = [w[0] for w in words if w and w[0].endswith(".py")]  # (-c and -m calls aside)
    assert scripts and all((ROOT / script).is_file() for script in scripts), scripts


def test_flops_count_products_and_cpu_attention_by_hand():
    """The GFLOP column: a matrix product is 2mkn, attention forward 2 products (4 b h s^2 d) and
    its backward 5 (the scores recomputed, then the four gradients' products: 10 b h s^2 d),
    the CPU attention kernels included (torch's own table lacks them)."""
    import torch
    import torch.nn.functional as F

    bench = _bench_models()
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))

    def step():
        a @ b
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    assert bench._flops(step) == 2 * 3 * 4 * 5 + (4 + 10) * 1 * 2 * 8 * 8 * 16
