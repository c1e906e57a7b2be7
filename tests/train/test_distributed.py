"""``nldsl run --nproc 2``: DDP (and FSDP) over 2 CPU processes with gloo give the loss curve
of one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_support import TINY, small
from nldsl.train import train

ARGS = ["--steps", "4", "--batch", "8", "--seq-len", "32", "--pairs", "4", "--eval-every", "2",
        "--eval-seqs", "8", "--log-every", "1", "--no-progress", "--no-plot", "--threads", "1",
        "--lr", "3e-3", "--warmup", "2", "dim=32", "layers=1", "heads=2", "vocab=256"]


def _losses(out: Path):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    one = train(small(tmp_path / "one", steps=4, eval_every=2, eval_seqs=8), quiet=True)
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "nldsl.run_cmd", TINY, *ARGS, "--nproc", "2", "--out", str(out)]
    if mode == "fsdp":
        cmd.append("--fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"2 processes ({mode})" in p.stderr
    assert p.stdout.count("final accuracy") == 1  # only rank 0 reports
    assert _losses(out) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert json.loads((out / "results.json").read_text())["final"]["acc"] == pytest.approx(one.final["acc"])
    # the checkpoint of a 2-process run is the same as a one-process checkpoint
    from nldsl.train import checkpoint as ckpt

    w2 = ckpt.load_checkpoint(ckpt.find_latest(out / "checkpoints")[0])[0]
    w1 = ckpt.load_checkpoint(Path(one.checkpoint))[0]
    assert set(w1) == set(w2)
    assert all((w1[k] - w2[k]).abs().max() < 1e-5 for k in w1)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_surprise_driven_writes_under_two_processes(tmp_path, mode):
    """Hope-Attention on lm: its blocks run as prefix and rest (the first layer's attention once
    per call, the CMS per surprise segment) and its CMS writes with the surprise of the next
    tokens (`learn`, outside the module's forward); FSDP all-gathers the weights for all three.
    2 processes give the loss curve of one."""
    spec = str(Path(__file__).resolve().parents[2] / "specs" / "cms.nl")
    one = train(small(tmp_path / "one", spec=spec, task="lm", steps=3, eval_every=3, eval_seqs=8, seq_len=64,
                      overrides={"dim": 32, "layers": 2, "heads": 2}), quiet=True)
    out = tmp_path / mode
    args = [a for a in ARGS if a not in ("layers=1",)] + ["layers=2", "--task", "lm"]
    args[args.index("--steps") + 1], args[args.index("--seq-len") + 1] = "3", "64"
    args[args.index("--eval-every") + 1] = "3"
    cmd = [sys.executable, "-m", "nldsl.run_cmd", spec, *args, "--nproc", "2", "--out", str(out)]
    if mode == "fsdp":
        cmd.append("--fsdp")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(out) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert one.final["bpb"] == pytest.approx(json.loads((out / "results.json").read_text())["final"]["bpb"])


def test_ctrl_c_under_nproc_saves_once_and_exits_130(tmp_path):
    """Ctrl-C reaches the launcher; the ranks finish the step, rank 0 saves, no stack traces."""
    import signal
    import time

    from nldsl.train import checkpoint as ckpt

    out = tmp_path / "r"
    args = [a for a in ARGS]
    args[args.index("--steps") + 1] = "100000"
    cmd = [sys.executable, "-m", "nldsl.run_cmd", TINY, *args, "--eval-every", "1000", "--nproc", "2",
           "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("saved a checkpoint at step") == 1
    folder, meta = ckpt.find_latest(out / "checkpoints")
    assert len(metrics.read_text().splitlines()) == meta["step"] >= 3
    assert not (out / ".ranks").exists()


def test_fsdp_trains_a_model_with_scalar_parameters(tmp_path):
    """Hope's learnable eta / alpha biases are 0-dim, which FSDP cannot shard: they run as [1]
    under FSDP (2 processes give one process's losses) and are saved in their own shape. Its
    streaming evaluation starts new sequences (`new_sequence` reads the CMS's initial weights,
    which FSDP gathers for it too): the same per-segment results as one process."""
    import nldsl
    from nldsl.train import checkpoint as ckpt

    spec = str(Path(__file__).resolve().parents[2] / "specs" / "hope.nl")
    overrides = {"dim": 32, "layers": 1, "heads": 2}
    one = train(small(tmp_path / "one", spec=spec, task="lm", steps=2, eval_every=2, eval_seqs=4, seq_len=32,
                      overrides=overrides, carry_state=True, segments=3), quiet=True)
    out = tmp_path / "fsdp"
    args = [a for a in ARGS if not a.startswith(("layers=", "dim=", "heads="))] + ["dim=32", "layers=1", "heads=2"]
    args += ["--task", "lm", "--nproc", "2", "--fsdp", "--out", str(out), "--carry-state", "--segments", "3"]
    args[args.index("--steps") + 1], args[args.index("--eval-every") + 1] = "2", "2"
    args[args.index("--eval-seqs") + 1] = "4"
    p = subprocess.run([sys.executable, "-m", "nldsl.run_cmd", spec, *args], capture_output=True, text=True,
                       timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(out) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    stream = json.loads((out / "results.json").read_text())["stream"]["modes"]
    assert set(stream) == {"carry", "reset", "new_sequence"}
    for mode, rows in one.stream["modes"].items():
        assert [r["loss"] for r in stream[mode]] == pytest.approx([r["loss"] for r in rows], rel=1e-5)
    weights = ckpt.load_checkpoint(ckpt.find_latest(out / "checkpoints")[0])[0]
    assert weights["blocks.0.titans.eta_bias"].shape == ()
    nldsl.compile(spec).Hope(**overrides).load_state_dict(weights)  # loads without FSDP
