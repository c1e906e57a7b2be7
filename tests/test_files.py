"""The one writer of output files (:func:`nldsl.files.write_atomic`): `nldsl compile`, `fmt -w`,
`graph -o` and `ablate` go through it."""
from __future__ import annotations

import os

import pytest

import nldsl.files
from nldsl.cli import main
from nldsl.files import write_atomic
from tests.nltest_support import REPO


def test_writes_and_skips_unchanged_content(tmp_path):
    path = tmp_path / "a.txt"
    assert write_atomic(path, "one\n") and path.read_text() == "one\n"
    os.utime(path, (1, 1))
    assert not write_atomic(path, "one\n", if_changed=True) and path.stat().st_mtime == 1
    assert write_atomic(path, "one\n") and path.stat().st_mtime != 1  # without if_changed: always
    assert write_atomic(path, b"two\n", if_changed=True) and path.read_bytes() == b"two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    path.write_text("old\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nldsl.files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_compile_writes_through_a_symlinked_output_file(tmp_path, monkeypatch):
    """`nldsl compile -o DIR` where DIR/module.py links elsewhere updates the linked file and
    keeps the link (the writer fmt and graph used already; compile's own replaced the link)."""
    monkeypatch.chdir(REPO)
    out, real = tmp_path / "out", tmp_path / "elsewhere.py"
    out.mkdir()
    real.write_text("# stale\n")
    (out / "module.py").symlink_to(real)
    assert main(["compile", "specs/linear_attention.nl", "-o", str(out)]) == 0
    assert (out / "module.py").is_symlink() and "class LinearAttention" in real.read_text()
    assert main(["compile", "specs/linear_attention.nl", "-o", str(out)]) == 0  # unchanged: idempotent
    assert (out / "module.py").is_symlink()
