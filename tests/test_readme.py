"""The README opens with the two commands; the main job's steps work (run through the CLI)."""
from __future__ import annotations

import re
import shlex
from glob import glob
from pathlib import Path

from nldsl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]


def test_main_job_steps_run(tmp_path, monkeypatch):
    """Each `$(BIN)/nldsl ...` line of the Makefile's demo target, run in process."""
    monkeypatch.chdir(ROOT)
    makefile = (ROOT / "Makefile").read_text()
    demo = re.search(r"^demo:.*?\n((?:\t.*\n)+)", makefile, re.M).group(1)
    steps = [line.strip() for line in demo.splitlines() if "nldsl " in line]
    assert steps
    for step in steps:
        argv = shlex.split(step.replace("$(BIN)/nldsl", "nldsl"))[1:]
        argv = [a for arg in argv for a in (sorted(glob(arg)) if "*" in arg else [arg])]
        for flag in ("-o", "--out"):
            if flag in argv:
                i = argv.index(flag)
                argv[i + 1] = str(tmp_path / Path(argv[i + 1]).name)
        if argv[0] == "run":  # the same command, shrunk to seconds
            argv += ["--steps", "2", "--batch", "4", "--seq-len", "32", "--eval-seqs", "4", "--no-plot",
                     "--no-progress", "dim=16", "layers=1"]
        assert main(argv) == 0, step
    assert (tmp_path / "hope.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("hope", "transformer", "gated_deltanet"):
        assert (tmp_path / name / "results.json").is_file()
