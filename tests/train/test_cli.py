"""``nldsl run`` on the command line: arguments, presets, messages and exit codes."""
from __future__ import annotations

import argparse
import json

import pytest

from train_support import TINY
from nldsl import run_cmd

SMALL = ["--steps", "4", "--batch", "8", "--seq-len", "32", "--pairs", "4", "--eval-every", "2",
         "--eval-seqs", "8", "--log-every", "1", "--no-progress", "--no-plot", "--threads", "1"]


def run(argv, capsys):
    code = run_cmd.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_run_with_overrides_anywhere(tmp_path, capsys):
    out = tmp_path / "r"
    code, stdout, err = run([TINY, "dim=32", *SMALL, "layers=1", "--out", out, "heads=2"], capsys)
    assert code == 0, err
    assert "TinyAttention on mqar (4 pairs): 4 steps" in stdout and "final accuracy" in stdout
    cfg = json.loads((out / "run.json").read_text())["config"]
    assert cfg["overrides"] == {"dim": 32, "layers": 1, "heads": 2, "vocab": 64}  # vocab: the preset's, for mqar
    assert cfg["preset"] == "cpu-demo" and cfg["steps"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


def test_registered_under_a_parent_parser(tmp_path):
    """How nldsl/cli.py registers it: build_subparser(sub); args.func(args)."""
    parser = argparse.ArgumentParser(prog="nldsl")
    sub = parser.add_subparsers(dest="command")
    run_cmd.build_subparser(sub)
    args = parser.parse_args(["run", TINY, "--steps", "3", "dim=32", "--out", str(tmp_path / "x"), "heads=2"])
    assert args.func is run_cmd.main_run
    assert args.overrides == ["dim=32", "heads=2"] and args.steps == 3


def test_preset_defaults_and_explicit_flags_win():
    p = argparse.ArgumentParser()
    run_cmd.add_arguments(p)
    cfg = run_cmd.config_from_args(p.parse_intermixed_args([TINY, "--device", "cpu", "--out", "/nonexistent/x"]))
    assert (cfg.preset, cfg.steps, cfg.seq_len, cfg.batch, cfg.pairs) == ("cpu-demo", 2000, 64, 16, 4)
    assert cfg.overrides == {"dim": 64, "layers": 2, "vocab": 64} and cfg.time_limit == 270
    assert cfg.lr == 1e-2
    assert 1 <= cfg.threads <= 4
    cfg = run_cmd.config_from_args(p.parse_intermixed_args(
        [TINY, "--preset", "full", "--steps", "7", "dim=48", "--out", "/nonexistent/x"]))
    assert (cfg.steps, cfg.seq_len, cfg.overrides, cfg.time_limit) == (7, None, {"dim": 48}, None)
    cfg = run_cmd.config_from_args(p.parse_intermixed_args([TINY, "--steps", "9", "--out", "/nonexistent/x"]))
    assert cfg.time_limit is None  # the demo's time budget holds only while the preset picks the steps


@pytest.mark.parametrize("extra, words", [
    (["--task", "mqr"], "unknown task 'mqr'; did you mean `mqar`?"),
    (["--task", "lm", "--data", "/no/such/file.txt"], "--data /no/such/file.txt: no such file"),
    (["dim=30", "heads=4"],
     "cannot build TinyAttention with dim=30 layers=2 vocab=64 heads=4: dim 30 is not divisible by heads 4"),
    (["dim"], "override 'dim' is not of the form key=value"),
    # the model's sizes are held to what a spec may write (they reached torch as errors of its own)
    (["dim=abc"], "cannot build TinyAttention with dim='abc' layers=2 vocab=64: dim must be a positive integer, "
                  "got 'abc'"),
    (["layers=0"], "layers must be a positive integer, got 0"),
    (["dim=64.0"], "dim must be a positive integer, got 64.0"),
    (["--steps", "0"], "--steps must be at least 1"),
    # numbers argparse accepts but training cannot use (they reached torch as internal errors)
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "-1"], "--lr must be a finite positive number, got -1.0"),
    (["--threads", "-2"], "--threads must be at least 1, got -2"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite non-negative number"),
    (["--clip", "-1"], "--clip must be a finite non-negative number"),
    (["--warmup", "-1"], "--warmup must be a finite non-negative number"),
    (["--ckpt-every", "-3"], "--ckpt-every must be at least 1"),
    (["--keep", "-1"], "--keep must be 0 (keep every checkpoint) or more"),
    (["--time-limit", "-5"], "--time-limit must be a non-negative number of seconds (0: no limit)"),
])
def test_bad_input_is_a_clear_message(tmp_path, capsys, extra, words):
    code, stdout, err = run([TINY, *SMALL, "--out", tmp_path / "r", *extra], capsys)
    assert code == 2
    assert words in err and "Traceback" not in err


def test_missing_spec_and_unwritable_out(tmp_path, capsys):
    code, _, err = run([tmp_path / "nope.nl", *SMALL, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "no such file" in err
    blocker = tmp_path / "f"
    blocker.write_text("x")
    code, _, err = run([TINY, *SMALL, "--out", blocker / "r"], capsys)
    assert code == 2 and "cannot write to the output folder" in err


def test_an_existing_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "r"
    assert run([TINY, *SMALL, "--out", out, "dim=32", "heads=2"], capsys)[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = run([TINY, *SMALL, "--out", out, "dim=32", "heads=2"], capsys)
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_text() == before
    code, _, err = run([TINY, *SMALL, "--steps", "6", "--out", out, "dim=32", "heads=2", "--resume"], capsys)
    assert code == 0, err
    assert "resuming from" in err
    code, _, _ = run([TINY, *SMALL, "--out", out, "dim=32", "heads=2", "--overwrite"], capsys)
    assert code == 0


def test_default_out_folders_do_not_collide(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert run([TINY, *SMALL, "dim=32", "heads=2"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny_model-mqar", "tiny_model-mqar-2"]


def test_spec_errors_render_diagnostics(tmp_path, capsys):
    bad = tmp_path / "bad.nl"
    bad.write_text("model M {\n  dim = \n}\n")
    code, _, err = run([bad, *SMALL, "--out", tmp_path / "r"], capsys)
    assert code == 1 and "bad.nl:" in err and "Traceback" not in err


def test_without_a_compiler_the_message_says_so(monkeypatch, tmp_path):
    import nldsl
    from nldsl.train.build import BuildError, build_model

    monkeypatch.delattr(nldsl, "compile", raising=False)
    spec = tmp_path / "m.nl"
    spec.write_text("model M { dim = 8 }\n")
    with pytest.raises(BuildError, match="no model compiler yet"):
        build_model(str(spec), {})


def test_nan_exit_code_and_message(tmp_path, capsys):
    code, _, err = run([TINY, *SMALL, "--out", tmp_path / "r", "--lr", "1e30", "--clip", "0",
                        "dim=32", "heads=2"], capsys)
    assert code == 1
    assert "stopped: the" in err and "last finite loss" in err


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_real_ctrl_c_saves_and_exits_130(tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys
    import time

    from nldsl.train import checkpoint as ckpt

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "nldsl.run_cmd", TINY, *SMALL, "--steps", "100000", "--eval-every", "1000",
           "--out", str(out), "dim=32", "layers=1", "heads=2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    p.send_signal(getattr(signal, sig))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr[-2000:]
    assert "interrupted at step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    folder, meta = ckpt.find_latest(out / "checkpoints")
    assert meta["step"] >= 3
    assert len(metrics.read_text().splitlines()) == meta["step"]  # log rows up to the saved step


def test_triton_kernels_on_a_cpu_are_a_clear_message(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = Path(__file__).resolve().parents[2] / "specs" / "gated_deltanet.nl"
    code, out, err = run([spec, "impl=triton", "--device", "cpu", *SMALL, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "internal error" not in err
    assert "impl=triton: the spec's generated Triton kernels run on a CUDA device, and this run is on cpu" in err
