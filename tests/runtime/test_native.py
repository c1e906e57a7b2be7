"""Building and loading the native CPU kernels (nldsl/runtime/_native.py): a build per source,
compiler and CPU in the cache, no half-written files, and without a compiler a warning and the
torch ops (their results are tested against the kernels in tests/runtime_deep/test_mlp_write.py)."""
from __future__ import annotations

import ctypes
import warnings

import pytest
import torch

from nldsl.runtime import _cms_block, _group_read, _mlp_write, _native, _running_read, conv
from nldsl.runtime._activations import activation, activation_grad, activation_grad2


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty cache and no built library in this process (before and after the test)."""
    monkeypatch.setenv("NLDSL_CACHE", str(tmp_path))
    monkeypatch.delenv("NLDSL_NATIVE", raising=False)
    caches = (_native._build, _mlp_write._library, _group_read._library, _running_read._library, conv._library)
    for c in caches:
        c.cache_clear()
    yield tmp_path
    for c in caches:
        c.cache_clear()


def _write_runs(dtype=torch.float64) -> str:
    """Which fused write a small piece runs: the name of its output's backward node."""
    N, L, D = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    w = [torch.randn(N, D, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(2)]
    k, v = (torch.randn(N, L, D, generator=g, dtype=dtype) for _ in range(2))
    eta = torch.full((N, L), 0.1, dtype=dtype)
    ws, *_ = _mlp_write.mlp_write(w, None, w, k, v, eta, None, None, objective="l2", signal="self", rule="dgd",
                                  act="gelu", residual=True)
    return type(ws[0].grad_fn).__name__


def test_a_build_is_cached_and_leaves_no_temporary_files(fresh):
    assert _write_runs() == "_NativeMlpWriteBackward"
    built = sorted(p.name for p in fresh.iterdir())
    assert len(built) == 1 and built[0].startswith("_mlp_write-double-") and built[0].endswith(".so"), built
    stamp = (fresh / built[0]).stat().st_mtime_ns
    _native._build.cache_clear()
    _mlp_write._library.cache_clear()
    assert _write_runs(torch.float32) == "_NativeMlpWriteBackward"
    assert _write_runs() == "_NativeMlpWriteBackward"
    names = sorted(p.name for p in fresh.iterdir())
    assert len(names) == 2 and built[0] in names and (fresh / built[0]).stat().st_mtime_ns == stamp


def test_without_a_compiler_the_write_warns_and_runs_the_torch_ops(fresh, monkeypatch):
    monkeypatch.setenv("CC", str(fresh / "no-such-compiler"))
    with pytest.warns(UserWarning, match="runs as torch ops"):
        assert _write_runs() == "_MlpWriteBackward"
    assert list(fresh.iterdir()) == []


def test_a_failed_build_names_the_error_and_leaves_nothing(fresh, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.warns(UserWarning, match="building _mlp_write.c failed"):
        assert _write_runs() == "_MlpWriteBackward"
    assert list(fresh.iterdir()) == []


def test_nldsl_native_0_turns_the_kernels_off(fresh, monkeypatch):
    monkeypatch.setenv("NLDSL_NATIVE", "0")
    assert _native.library("_mlp_write", torch.float64) is None
    assert _write_runs() == "_MlpWriteBackward"
    assert list(fresh.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", _native.ACTIVATIONS)
def test_the_kernels_activations_equal_the_torch_formulas(dtype, name):
    """The kernels compute the hidden layer's activation and its first two derivatives themselves:
    against the torch formulas of _activations in float64, over [-30, 30], tiny values of both
    signs and far out (no overflow, no NaN). float64 (libm) to 1e-13; float32 (exp by a polynomial,
    erfc by a rational approximation) to 2e-6 of max(1, |x|): torch's own float32 ops are no
    closer."""
    lib = _mlp_write._library(dtype)
    assert lib is not None, "the C kernel did not build (is a C compiler installed?)"
    tiny = torch.logspace(-30, 0, 301, dtype=torch.float64)
    x = torch.cat([torch.linspace(-30, 30, 60001, dtype=torch.float64), tiny, -tiny,
                   torch.tensor([0.0, 90.0, -90.0, 1e4, -1e4], dtype=torch.float64)]).to(dtype)
    got = [torch.full_like(x, float("nan")) for _ in range(3)]
    lib.activations(ctypes.c_int64(_native.ACTIVATIONS.index(name)), _native.pointer(x), ctypes.c_int64(x.numel()),
                    *map(_native.pointer, got))
    xd = x.double()
    bound = (2e-6 if dtype == torch.float32 else 1e-13) * xd.abs().clamp_min(1.0)
    for what, a, ref in zip(("value", "first derivative", "second derivative"), got,
                            (activation(xd, name), activation_grad(xd, name), activation_grad2(xd, name))):
        err = (a.double() - ref).abs()
        assert torch.isfinite(a).all() and (err <= bound).all(), \
            f"{name} {what}: off by {err.max():.2e} at x = {xd[(err - bound).argmax()].item():.6g}"


@pytest.mark.parametrize("name", ["_mlp_write", "_group_read", "_running_read", "_conv", "_cms_block"])
def test_the_kernels_split_their_rows_over_torchs_threads(name):
    """Where torch runs on GNU OpenMP the kernels link that very runtime: their rows go to torch's
    intra-op pool, as many threads as torch.set_num_threads gives it (a runtime of their own
    would ignore it, and its pool would compete with torch's for the cores); elsewhere one thread."""
    lib = _native.library(name, torch.float64)
    assert lib is not None, "the C kernel did not build (is a C compiler installed?)"
    lib.threads.restype = ctypes.c_int64
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert lib.threads() == (n if _native._openmp() else 1)
    finally:
        torch.set_num_threads(before)


def test_a_compiler_without_openmp_builds_a_kernel_for_one_thread(fresh, monkeypatch):
    """Where the OpenMP build fails (a compiler without omp.h), the kernel still builds, for one
    thread, without a warning."""
    cc = fresh / "cc-without-openmp"
    cc.write_text('#!/bin/sh\ncase "$*" in *-fopenmp*) exit 1;; esac\nexec cc "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lib = _native.library("_mlp_write", torch.float64)
    assert lib is not None and _write_runs() == "_NativeMlpWriteBackward"
    lib.threads.restype = ctypes.c_int64
    assert lib.threads() == 1
    assert [p.suffix for p in fresh.iterdir() if p != cc] == [".so"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_cms_blocks_run_on_torchs_blas_or_not_at_all(dtype, monkeypatch):
    """The CMS's C blocks call the gemm of torch's own BLAS (found in its library, its calling
    convention checked on one product); without it (another build of torch, NLDSL_NATIVE=0)
    they are not used, and the CMS runs its torch ops."""
    x = torch.zeros(2, 3, 4, dtype=dtype)
    assert _cms_block.library(x) is not None, "torch's BLAS gemm was not found (or the C kernel did not build)"
    monkeypatch.setattr(_cms_block, "_symbol", lambda name: None)
    _cms_block._loaded.cache_clear()
    try:
        assert _cms_block.library(x) is None
    finally:
        _cms_block._loaded.cache_clear()
    monkeypatch.setenv("NLDSL_NATIVE", "0")
    assert _cms_block.library(x) is None
