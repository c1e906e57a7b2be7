"""A pytest plugin for test runs on a GPU: after a sticky CUDA error (an illegal memory access, a
device-side assert, ...) every later CUDA call of the process fails with the same error, so one
faulty kernel would fail every test after it on that process. The test that hit it is reported
as it failed; then a pytest-xdist worker exits, so xdist starts a fresh one for the rest of the
run, and a single process stops the run with a message (its later results would say nothing)."""
from __future__ import annotations

import os

import pytest

#: CUDA's messages for the errors that leave a process's context unusable
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",
    "misaligned address",
    "unspecified launch failure",
    "device-side assert triggered",
    "an illegal instruction was encountered",
    "hardware stack error",
    "invalid program counter",
    "operation not supported on global/shared address space",
    "uncorrectable ECC error encountered",
)

_FAULT = pytest.StashKey[str]()


def sticky_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports one of :data:`STICKY_CUDA_ERRORS`."""
    text = str(exc)
    return any(m in text for m in STICKY_CUDA_ERRORS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and sticky_cuda_error(call.excinfo.value):
        item.stash[_FAULT] = call.excinfo.exconly().splitlines()[0]
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    result = yield
    fault = item.stash.get(_FAULT, None)
    if fault is not None:
        if hasattr(item.config, "workerinput"):  # a pytest-xdist worker
            os._exit(3)  # after the test's reports went out; xdist replaces the worker
        pytest.exit(f"{item.nodeid} left this process's CUDA context unusable ({fault}); the run stops "
                    "here (with pytest-xdist, -n N, a fresh worker would go on)", returncode=1)
    return result
