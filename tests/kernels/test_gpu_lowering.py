"""Every generated kernel compiles for a GPU, also on a machine without one: the interpreter,
which runs the kernels in the other tests on a CPU, skips the compiler's checks (gpu_lowering.py
says which). For Hopper (sm_90) every case; for Ampere (sm_80, less shared memory a block) the
training steps of the two shipped specs with a kernel that does not fit there at Triton's
default pipelining depth, which the runtime must launch again shallower. Two shards run at once,
one per core."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install 'nldsl[triton]')")

SCRIPT = Path(__file__).with_name("gpu_lowering.py")


@pytest.mark.parametrize("arch,cases", [("90", ["--cases", "linear", "mlp", "models"]),
                                        ("80", ["--cases", "models", "--specs", "hope", "adatransformer"])])
def test_every_kernel_compiles_for_a_gpu(arch, cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), f"--arch={arch}", f"--shard={i}/2", *cases],
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [run.communicate()[0] for run in runs]
    for run, out in zip(runs, outputs):
        last = out.strip().splitlines()[-1] if out.strip() else ""
        assert run.returncode == 0 and last.endswith(": 0 failed"), out[-6000:]
    if arch == "80":  # Hope's CMS gradient kernel and AdaTransformer's memory backward need 176 KiB
        assert sum(int(out.split(" refused")[0].split()[-1]) for out in outputs) >= 2, outputs


def test_launch_retries_with_shallower_pipelining(monkeypatch):
    """A launch refused for its shared memory runs again at num_stages 2, then 1; the depth that
    worked is kept for the next launch; other refusals, and one at depth 1, are the caller's."""
    import torch
    import torch.library
    from triton.runtime.errors import OutOfResources

    from nldsl.runtime import _triton

    calls = []

    class Kernel:
        def __init__(self, fits_at):
            self.fits_at = fits_at

        def __getitem__(self, grid):
            def run(*args, num_stages=3, **kwargs):
                calls.append(num_stages)
                if num_stages > self.fits_at:
                    raise OutOfResources(1000 * num_stages, 1500, "shared memory")
            return run

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    x = torch.zeros(2)
    two = Kernel(fits_at=2)
    _triton.launch(two, (1,), x)
    _triton.launch(two, (1,), x)
    assert calls == [3, 2, 2]
    calls.clear()
    with pytest.raises(OutOfResources):
        _triton.launch(Kernel(fits_at=0), (1,), x)
    assert calls == [3, 2, 1]

    class Registers(Kernel):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(300, 255, "registers")
            return run

    with pytest.raises(OutOfResources, match="registers"):
        _triton.launch(Registers(0), (1,), x)


def test_launch_traces_whole_under_torch_compile(monkeypatch):
    """Dynamo traces ``launch`` without a graph break (the compiled models use fullgraph), taking
    the branch that hands the kernel to inductor as it is."""
    import torch
    import torch.library

    from nldsl.runtime import _triton

    class Kernel:  # stands in for wrap_triton(kernel): doubles x into out
        def __getitem__(self, grid):
            return lambda x, out, **kwargs: out.copy_(2 * x)

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    kernel = Kernel()

    def double(x):
        out = torch.empty_like(x)
        _triton.launch(kernel, (1,), x, out, DOT="ieee")
        return out

    x, before = torch.arange(4.0), dict(_triton._STAGES)
    assert torch.equal(torch.compile(double, fullgraph=True, backend="eager")(x), 2 * x)
    assert _triton._STAGES == before  # the eager-only bookkeeping was not traced


def test_launch_overrides_by_stage(monkeypatch):
    """Launch overrides (what diagnose_kernels.py and bench_triton --launch set) go over a launch's
    own options within their block, ``*`` for every kernel and a stage for the kernels whose name
    ends in it; a malformed configuration is refused."""
    import torch
    import torch.library

    from nldsl.runtime import _triton

    seen = {}

    class Kernel:
        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen[self.__name__] = kwargs
            return run

    monkeypatch.setattr(torch.library, "wrap_triton", lambda kernel: kernel)
    x = torch.zeros(2)
    with _triton.launch_overrides("*:w1;output:s1") as found:
        assert found == {"*": {"num_warps": 1}, "output": {"num_stages": 1}}
        for name in ("mem_output", "mem_state_grads"):
            _triton.launch(Kernel(name), (1,), x, DOT="ieee", num_warps=4)
    assert seen == {"mem_output": {"DOT": "ieee", "num_warps": 1, "num_stages": 1},
                    "mem_state_grads": {"DOT": "ieee", "num_warps": 1}}
    assert _triton.LAUNCH_OVERRIDES == {}
    _triton.launch(Kernel("mem_output"), (1,), x, DOT="ieee", num_warps=4)
    assert seen["mem_output"] == {"DOT": "ieee", "num_warps": 4}
    for bad in ("w2", "*:x2", "*:w", ":w2"):
        with pytest.raises(ValueError, match="expected STAGE:OPTIONS"), _triton.launch_overrides(bad):
            pass
