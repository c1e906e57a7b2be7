"""Every generated kernel compiles for a Hopper GPU (sm_90), also on a machine without one: the
interpreter, which runs the kernels in the other tests on a CPU, skips the compiler's checks
(gpu_lowering.py says which). Two shards run at once, one per core."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'nldsl[triton]')")

SCRIPT = Path(__file__).with_name("gpu_lowering.py")


def test_every_kernel_compiles_for_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), f"--shard={i}/2"], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [run.communicate()[0] for run in runs]
    for run, out in zip(runs, outputs):
        last = out.strip().splitlines()[-1] if out.strip() else ""
        assert run.returncode == 0 and last.endswith(": 0 failed"), out[-6000:]
