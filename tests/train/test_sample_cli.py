"""``nldsl sample`` on the command line: a run's model rebuilt from its checkpoint, the text it
writes, and clear messages for what cannot be sampled."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from train_support import TINY
from nldsl import run_cmd, sample_cmd
from nldsl.cli import main as cli_main

SPEC = Path(__file__).resolve().parents[2] / "specs" / "gated_deltanet.nl"
TRAIN = ["--steps", "2", "--batch", "2", "--seq-len", "16", "--eval-every", "2", "--eval-seqs", "2",
         "--log-every", "1", "--no-progress", "--no-plot", "--threads", "1", "dim=16", "layers=1", "heads=2"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A run of a copy of the Gated DeltaNet spec on the lm task (bytes: vocab 256)."""
    root = tmp_path_factory.mktemp("sample")
    spec = root / "gdn.nl"
    shutil.copy(SPEC, spec)
    shutil.copy(SPEC.with_name("adam.nl"), root)  # its optimizer's include
    assert run_cmd.main([str(spec), "--task", "lm", "--out", str(root / "run"), *TRAIN]) == 0
    return root / "run", spec


def sample(argv, capsys):
    code = cli_main(["sample", *map(str, argv)])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_text_is_the_prompt_and_its_continuation(lm_run, capsys):
    run, _ = lm_run
    code, out, err = sample([run, "--prompt", "def f(", "--tokens", "24", "--seed", "7"], capsys)
    assert code == 0, err
    assert out.startswith("def f(") and out.endswith("\n")
    assert "GatedDeltaNet at step 2 of" in err and "read 6 prompt tokens in" in err and "sampled 24 in" in err
    assert sample([run, "--prompt", "def f(", "--tokens", "24", "--seed", "7"], capsys)[1] == out  # seeded

    # the same tokens as the API's with the same generator: the checkpoint's model, not a fresh one
    folder, meta = sample_cmd.find_checkpoint(run)
    model, _ = sample_cmd.load_model(folder, meta, torch.device("cpu"))
    prompt = torch.tensor([list(b"def f(")])
    tokens = model.generate(prompt, 24, temperature=0.8, generator=torch.Generator().manual_seed(7)).tokens
    assert out == (b"def f(" + bytes(tokens[0].tolist())).decode("utf-8", errors="replace") + "\n"


def test_ids_samples_and_a_checkpoint_folder(lm_run, capsys):
    run, _ = lm_run
    step = next((run / "checkpoints").glob("step_*"))
    code, out, err = sample([step, "--ids", "100,101 102", "--tokens", "5", "--samples", "3", "--temperature", "0"],
                            capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0::2] == ["--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]
    rows = [list(map(int, line.split())) for line in lines[1::2]]
    assert all(r[:3] == [100, 101, 102] and len(r) == 8 for r in rows)
    assert rows[0] == rows[1] == rows[2]  # greedy: the same continuation


def test_a_hand_written_model_samples_too(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert run_cmd.main([TINY, "--out", str(out), *TRAIN[:-3], "dim=32", "layers=1", "heads=2"]) == 0
    capsys.readouterr()
    code, stdout, err = sample([out, "--ids", "1 2 3", "--tokens", "4"], capsys)
    assert code == 0, err
    assert stdout.split()[:3] == ["1", "2", "3"] and len(stdout.split()) == 7
    # trained on mqar (at the cpu-demo preset's 64 tokens): not text, whatever the prompt's bytes
    for extra in (["--prompt", "hello"], ["--prompt", "\x01"], []):
        code, out_text, err = sample([out, *extra], capsys)
        assert code == 2 and out_text == "" and "not trained on text" in err and "--ids" in err


@pytest.mark.parametrize("extra, words", [
    (["--top-k", "0"], "--top-k must be an int from 1 to the vocabulary's 256"),
    (["--top-p", "1.5"], "--top-p must be a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--tokens", "-3"], "--tokens must be 0 or more"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--ids", "1 999"], "token 999 is outside the model's vocabulary of 256"),
    (["--ids", "1 x"], "--ids must be integers"),
    (["--ids", " , "], "--ids is empty"),
    (["--prompt", ""], "--prompt is empty"),
])
def test_bad_options_are_clear_messages(lm_run, capsys, extra, words):
    code, out, err = sample([lm_run[0], *extra], capsys)
    assert code == 2 and out == ""
    assert words in err and "Traceback" not in err


def test_what_is_not_a_run_says_so(lm_run, tmp_path, capsys):
    run, _ = lm_run
    code, _, err = sample([tmp_path / "nothere"], capsys)
    assert code == 2 and "no such folder" in err
    code, _, err = sample([run / "checkpoints"], capsys)
    assert code == 2 and "not a run folder" in err and "checkpoints/step_*" in err
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    code, _, err = sample([tmp_path / "empty"], capsys)
    assert code == 2 and "no complete checkpoint" in err

    damaged = tmp_path / "damaged"
    shutil.copytree(next((run / "checkpoints").glob("step_*")), damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    code, _, err = sample([damaged], capsys)
    assert code == 2 and "incomplete or damaged" in err


def test_a_changed_spec_is_refused(lm_run, capsys, monkeypatch):
    run, spec = lm_run
    original = spec.read_text()
    try:
        spec.write_text(original.replace("qk_norm l2", "qk_norm none", 1))  # the same weights, another model
        code, out, err = sample([run, "--tokens", "3"], capsys)
        assert code == 2 and out == ""
        assert "changed since" in err and "may no longer build the model that was trained" in err
        moved = spec.with_name("moved.nl")
        spec.rename(moved)
        code, _, err = sample([run], capsys)
        assert code == 2 and "cannot rebuild the model" in err and "no such file" in err and "--spec FILE" in err
        moved.write_text(original)
        code, out, err = sample([run, "--spec", moved, "--tokens", "3"], capsys)  # the same text elsewhere
        assert code == 0, err
    finally:
        spec.write_text(original)
    # the same text resolved otherwise (a default of another nldsl version)
    from nldsl.train import build

    real = build.model_info
    monkeypatch.setattr(build, "model_info", lambda *a: real(*a) | {"resolved_hash": "0" * 64})
    code, _, err = sample([run, "--tokens", "3"], capsys)
    assert code == 2 and "a default differs" in err


def test_a_text_run_says_how_to_sample_it(tmp_path):
    from nldsl.train.loop import RunResult
    from nldsl.train.report import format_table

    res = RunResult(0, "ok", None, 2, tmp_path / "my run", task="lm (stdlib, 3.7 MB)", checkpoint="x")
    assert f"sample it: nldsl sample '{tmp_path / 'my run'}'   (--prompt TEXT" in format_table(res)
    res.task = "mqar (4 pairs)"
    assert "nldsl sample" not in format_table(res)


def test_cuda_without_a_gpu_is_a_clear_message(lm_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    code, out, err = sample([lm_run[0], "--device", "cuda"], capsys)
    assert code == 2 and out == "" and "no CUDA device" in err


def test_a_prompt_file_is_read_as_bytes(lm_run, tmp_path, capsys):
    run, _ = lm_run
    context = tmp_path / "context.py"
    context.write_bytes("# café\nimport os\n".encode())
    code, out, err = sample([run, "--prompt-file", context, "--tokens", "6", "--temperature", "0"], capsys)
    assert code == 0, err
    assert "continuing" in err and "(18 bytes; the continuation alone follows)" in err
    same = sample([run, "--prompt", "# café\nimport os\n", "--tokens", "6", "--temperature", "0"], capsys)[1]
    assert same.startswith("# café\nimport os\n") and out == same[len("# café\nimport os\n"):]
    code, out, err = sample([run, "--prompt-file", tmp_path / "missing.txt"], capsys)
    assert code == 2 and out == "" and "missing.txt" in err and "No such file" in err
    (tmp_path / "empty.txt").write_bytes(b"")
    code, _, err = sample([run, "--prompt-file", tmp_path / "empty.txt"], capsys)
    assert code == 2 and "is empty" in err


def test_what_counts_as_text():
    assert sample_cmd.trained_on_text({"task": "lm"})
    assert sample_cmd.trained_on_text({"task": "continual", "phases": None})  # the default phases end with lm
    assert sample_cmd.trained_on_text({"task": "continual", "phases": "mqar:A, lm"})
    assert not sample_cmd.trained_on_text({"task": "continual", "phases": "mqar:A,mqar:B"})
    assert not sample_cmd.trained_on_text({"task": "niah"})


def test_an_id_past_a_byte_prints_as_a_replacement_character(lm_run, capsys, monkeypatch):
    """A text model with a vocabulary over 256 may draw an id that is no byte: shown as U+FFFD."""
    from nldsl.nn.model import NSAMModel
    from nldsl.nn.sampling import GenerateOutput

    def fake(self, input_ids, n, on_token=None, **kw):
        for t in (300, ord("a")):
            on_token(torch.tensor([t]))
        return GenerateOutput(torch.tensor([[300, ord("a")]]), None)

    monkeypatch.setattr(NSAMModel, "generate", fake)
    code, out, err = sample([lm_run[0], "--prompt", "x", "--tokens", "2"], capsys)
    assert code == 0, err
    assert out == "x\ufffda\n"


def test_a_run_trained_with_triton_kernels_samples_on_cpu(lm_run, tmp_path, capsys):
    """impl='triton' (a GPU run) samples on a CPU through the PyTorch ops: the same weights and
    computation, said in a note, instead of failing in the kernels."""
    import json

    run = tmp_path / "triton_run"
    shutil.copytree(lm_run[0], run)
    state = next(run.glob("checkpoints/step_*/state.json"))
    meta = json.loads(state.read_text())
    meta["config"]["overrides"]["impl"] = "triton"
    state.write_text(json.dumps(meta))
    code, out, err = sample([run, "--tokens", "4", "--temperature", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "trained with impl='triton'; on cpu its memories run the PyTorch ops" in err
    assert out == sample([lm_run[0], "--tokens", "4", "--temperature", "0", "--device", "cpu"], capsys)[1]
