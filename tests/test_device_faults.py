"""tests/device_faults.py: a sticky CUDA error ends its process after the failing test is reported
(simulated by its message: the plugin reads nothing else), so later tests run on a fresh worker."""
from __future__ import annotations

import subprocess
import sys

from tests.device_faults import sticky_cuda_error
from tests.nltest_support import REPO

FAKE = '''
import pytest

@pytest.mark.parametrize("i", range(6))
def test_case(i):
    if i == 1:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\\\\nCompile with ...")
    assert i != 3  # an ordinary failure: the process goes on
'''


def run(tmp_path, *args) -> subprocess.CompletedProcess:
    (tmp_path / "test_fake.py").write_text(FAKE)
    cmd = [sys.executable, "-m", "pytest", "-p", "tests.device_faults", "-p", "no:cacheprovider", "-rfE", *args,
           str(tmp_path)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_sticky_errors_are_told_from_others():
    assert sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert sticky_cuda_error(RuntimeError("Triton Error [CUDA]: misaligned address"))
    assert not sticky_cuda_error(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not sticky_cuda_error(AssertionError("tensors differ"))


def test_a_single_process_stops_after_the_faulty_test(tmp_path):
    r = run(tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "1 failed, 1 passed" in out, out  # case 0 passed, case 1 failed, nothing after it ran
    assert "test_case[1] left this process's CUDA context unusable" in out, out


def test_an_xdist_worker_is_replaced_and_the_run_goes_on(tmp_path):
    r = run(tmp_path, "-n", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    # every other case ran and passed; case 3's ordinary failure did not end its worker; case 1
    # is reported twice, as it failed and as its worker ended
    assert "3 failed, 4 passed" in out, out
    assert "crashed while running" in out and "test_case[1]'" in out, out
