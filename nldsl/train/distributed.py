"""Many processes: ``nldsl run --nproc N`` re-invokes the same command under
``torch.distributed.run`` (torchrun), one process per rank; DDP (or FSDP with ``--fsdp``) over
the model.

What is synchronised: the gradients of nn.Parameters, which are exactly the outer level's
(step-clock) memories; a compiled model carries every in-context (token-clock) state in
tensors passed through ``forward``, never in Parameters, so those states stay per sequence and
per rank. Every rank generates the same global batch from ``(seed, step)`` and trains on its
own slice; the loss is scaled so the averaged gradient equals the gradient of the global
batch's mean loss, whatever the number of ranks.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

LAUNCHED_ENV = "NLDSL_LAUNCHED"
PID_DIR_ENV = "NLDSL_RANK_PIDS"


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            tdist.all_reduce(t)
        return t

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.enabled:
            tdist.barrier()

    def close(self):
        if not (self.enabled and tdist.is_initialized()):
            return
        if self.backend == "gloo":
            # the ranks tear the group down together: a rank that exits while its peer still
            # saves drops connections its own gloo threads read, and it aborts (SIGABRT, seen
            # after Ctrl-C under --nproc); a rank that never comes is waited for a minute at most
            try:
                tdist.monitored_barrier(timeout=timedelta(seconds=60))
            except Exception:
                pass
        try:
            tdist.destroy_process_group()
        except Exception:
            pass


def in_launched_child() -> bool:
    return os.environ.get(LAUNCHED_ENV) == "1" and int(os.environ.get("WORLD_SIZE", "1")) >= 1


def init(device: str) -> Dist:
    """Joins the process group torchrun set up (WORLD_SIZE > 1); a no-op for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return Dist(rank, world, local, backend)


def find_unused(model, vocab: int, device) -> bool:
    """Whether some parameters get no gradient (DDP must then be told); one tiny dry run."""
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    out = model(ids)
    logits = out[0] if isinstance(out, tuple) else out.logits
    logits.float().sum().backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


def wrap(model, dist: Dist, device, fsdp: bool):
    """DDP or FSDP over ``model`` (already on its device). Returns (wrapped, kind)."""
    if not dist.enabled:
        return model, "single"
    if fsdp:
        import warnings

        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        # the loop never modifies a model output in place, so this FSDP2 warning does not apply
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")

        # FSDP shards no 0-dim parameter (a learnable bias such as Hope's eta_bias): each becomes
        # [1], which broadcasts where it did; full_state_dict gives them back their shape
        model.fsdp_scalars = [name for name, p in model.named_parameters() if p.dim() == 0]
        for name in model.fsdp_scalars:
            p = model.get_parameter(name)
            p.data = p.data.reshape(1)

        for block in getattr(model, "blocks", []):
            for child in block.children():  # methods that read its weights outside its forward
                methods = getattr(child, "fsdp_methods", ())
                if methods:
                    fully_shard(child)
                    for method in methods:
                        register_fsdp_forward_method(child, method)
            fully_shard(block)
            for method in ("prefix", "rest"):  # a split block (NSAMModel.forward calls them directly)
                if callable(getattr(block, method, None)):
                    register_fsdp_forward_method(block, method)
        fully_shard(model)
        return model, "fsdp"
    from torch.nn.parallel import DistributedDataParallel as DDP

    vocab = getattr(getattr(model, "config", None), "vocab", 256)
    unused = find_unused(model, vocab, device)
    ids = [dist.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=unused), "ddp"


def unwrap(model):
    return getattr(model, "module", model)


def full_state_dict_shapes(model, state: dict) -> dict:
    """A model state dict taken under FSDP, with the 0-dim parameters :func:`wrap` made [1]
    back in their own shape (what a model built without FSDP loads)."""
    for name in getattr(model, "fsdp_scalars", ()):
        if name in state:
            state[name] = state[name].reshape(())
    return state


def launch(argv: list[str], nproc: int, pid_dir: Path | None = None) -> int:
    """Runs ``python -m nldsl.run_cmd ARGV`` in ``nproc`` processes under torchrun; returns its
    exit status (0 when every rank finished).

    torchrun runs in its own session, so a Ctrl-C at the terminal reaches only this process,
    which passes it on to the ranks themselves (their pids are in ``pid_dir``): they finish the
    step, save and exit cleanly, and torchrun ends without a stack trace of its own. SIGTERM is
    passed on the same way.
    """
    import signal

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "nldsl.run_cmd", *argv]
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    if pid_dir is not None:
        env[PID_DIR_ENV] = str(pid_dir)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(sig):
        pids = []
        for f in sorted(Path(pid_dir).glob("*.pid")) if pid_dir is not None else []:
            try:
                pids.append(int(f.read_text()))
            except (OSError, ValueError):
                pass
        sent = False
        for pid in pids:
            try:
                os.kill(pid, sig)
                sent = True
            except OSError:
                pass
        if not sent:  # the ranks have not started yet: stop the whole group
            try:
                os.killpg(proc.pid, sig)
            except OSError:
                pass

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a shell may have set SIGINT to ignore
        try:
            old[sig] = signal.signal(sig, lambda signum, frame: forward(signum))
        except (ValueError, OSError):
            pass
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                forward(signal.SIGINT)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def record_pid() -> None:
    """A rank started by :func:`launch` leaves its pid where the launcher can signal it."""
    d = os.environ.get(PID_DIR_ENV)
    if d:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
        except OSError:
            pass
