"""``nldsl run SPEC [options] [key=value ...]``: train and evaluate a spec's model on an
embedded task (mqar, lm, niah, continual), on one CPU, one GPU or many processes.

Exit codes: 0 done (or stopped at --time-limit), 1 spec diagnostics or a diverged loss,
2 usage / data / I/O problems, 130 interrupted (a checkpoint was saved first).

``python -m nldsl.run_cmd ...`` runs the same command (used by ``--nproc`` to start ranks).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FROM_CONFIG = "--from-config"

DESCRIPTION = ("Train and evaluate a spec's model on an embedded task (mqar, lm, niah, continual), "
               "on one CPU, one GPU or many processes.")
EPILOG = """\
examples:
  nldsl run specs/hope.nl                        train Hope on MQAR (cpu-demo preset on a CPU)
  nldsl run specs/transformer.nl dim=128 layers=4 --steps 1000
  nldsl run specs/hope.nl --task lm --carry-state
  nldsl run specs/hope.nl --task continual       MQAR keys A, then keys B, then LM: forgetting
  nldsl run specs/hope.nl --nproc 2              DDP over 2 processes (gloo on CPU, nccl on GPU)
  nldsl run model.py:MyModel                     a hand-written NSAMModel subclass
key=value arguments override the spec's values (passed to the model class as keywords).
"""


def _intermixed(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Lets ``key=value`` overrides come before, between or after options (argparse alone takes
    positionals only in one run). The subcommand parser is called through parse_known_args."""
    plain = argparse.ArgumentParser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        if getattr(parser, "_nldsl_inside", False):
            return plain(parser, args, namespace)
        parser._nldsl_inside = True
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser._nldsl_inside = False

    parser.parse_known_args = parse_known_args
    return parser


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nldsl.train.config import DEVICES, DTYPES, PRESETS

    p.add_argument("spec", metavar="SPEC", help="a .nl spec (or model.py[:Class], a hand-written model)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override spec values (dim=64 layers=2)")
    t = p.add_argument_group("task")
    t.add_argument("--task", default="mqar", help="mqar (default), lm, niah or continual")
    t.add_argument("--pairs", type=int, help="mqar: key-value pairs per sequence (cpu-demo: 4)")
    t.add_argument("--needles", type=int, default=1, help="niah: needles per sequence (default 1)")
    t.add_argument("--data", metavar="FILE", help="lm: train on this text file instead of the Python stdlib")
    t.add_argument("--phases", help="continual: comma-separated phases (default mqar:A,mqar:B,lm)")
    o = p.add_argument_group("training")
    o.add_argument("--preset", choices=sorted(PRESETS),
                   help="default sizes: cpu-demo (the default without a GPU: dim 64, 2 layers, "
                        "MQAR on a 64-token vocabulary) or full (the spec's sizes)")
    o.add_argument("--steps", type=int)
    o.add_argument("--batch", type=int, help="global batch, split across processes")
    o.add_argument("--seq-len", type=int, dest="seq_len")
    o.add_argument("--lr", type=float)
    o.add_argument("--warmup", type=int, help="warmup steps (default: min(100, steps/10))")
    o.add_argument("--schedule", choices=("cosine", "constant"))
    o.add_argument("--weight-decay", type=float, dest="weight_decay",
                   help="on the matrices (default 0.01, where the optimizer has weight decay)")
    o.add_argument("--clip", type=float, default=1.0, help="gradient clipping norm (0: off)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", choices=DEVICES)
    o.add_argument("--dtype", default="float32", choices=DTYPES)
    o.add_argument("--threads", type=int,
                   help="CPU threads per process (cpu-demo: half the cores, 1 to 4; full: torch's choice)")
    o.add_argument("--model", dest="model_name", metavar="NAME",
                   help="the model block to train, when a spec has several")
    o.add_argument("--time-limit", type=float, dest="time_limit", metavar="SECONDS",
                   help="stop training after this long, then evaluate and save (0: no limit; "
                        "cpu-demo: 270 unless --steps is given)")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=int, dest="eval_every")
    e.add_argument("--eval-seqs", type=int, dest="eval_seqs", help="held-out sequences per evaluation")
    e.add_argument("--log-every", type=int, dest="log_every")
    e.add_argument("--ckpt-every", type=int, dest="ckpt_every", help="default: every evaluation")
    e.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2; 0: all)")
    e.add_argument("--carry-state", action="store_true", dest="carry_state",
                   help="also evaluate a long stream fed in segments, state carried across calls")
    e.add_argument("--segments", type=int, default=6, help="segments of the streaming evaluation")
    e.add_argument("--out", "-o", metavar="DIR", help="output folder (default runs/SPEC-TASK)")
    e.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    e.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    e.add_argument("--no-progress", action="store_false", dest="progress", default=None)
    e.add_argument("--no-plot", action="store_false", dest="plot", default=True)
    d = p.add_argument_group("distributed")
    d.add_argument("--nproc", type=int, default=1, help="processes (torchrun underneath; DDP)")
    d.add_argument("--fsdp", action="store_true", help="shard the model with FSDP instead of DDP")


def build_subparser(sub) -> argparse.ArgumentParser:
    """Registers ``run`` on the CLI's subparsers (``sub = parser.add_subparsers(...)``)."""
    p = sub.add_parser("run", help="train and evaluate a spec's model on an embedded task",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main_run)
    return _intermixed(p)


class _Usage(Exception):
    pass


def _holds_run(d: Path) -> bool:
    return (d / "metrics.jsonl").exists() or (d / "checkpoints").is_dir()


def _default_out(spec: str, task: str, resume: bool) -> Path:
    stem = Path(spec.rpartition(":")[0] if ":" in spec and not Path(spec).exists() else spec).stem
    base = Path("runs") / f"{stem}-{task}"
    candidates = [base] + [base.with_name(f"{base.name}-{i}") for i in range(2, 1000)]
    if resume:  # the newest run of this spec and task
        existing = [c for c in candidates if _holds_run(c)]
        return existing[-1] if existing else base
    for c in candidates:
        if not _holds_run(c):
            return c
    raise _Usage(f"{base}: too many runs; pass --out DIR")


# option (dest), what it must be, the test; argparse checks only the type. A preset's values pass.
_OPTION_RULES = (
    *((name, "at least 1", lambda v: v >= 1) for name in (
        "steps", "batch", "eval_every", "log_every", "eval_seqs", "segments", "pairs", "threads", "ckpt_every",
        "nproc")),
    ("seq_len", "at least 2", lambda v: v >= 2),
    ("lr", "a finite positive number", lambda v: math.isfinite(v) and v > 0),
    *((name, "a finite non-negative number", lambda v: math.isfinite(v) and v >= 0) for name in (
        "weight_decay", "clip", "warmup")),
    ("keep", "0 (keep every checkpoint) or more", lambda v: v >= 0),
    ("time_limit", "a non-negative number of seconds (0: no limit)", lambda v: v >= 0),
)


def check_options(args) -> None:
    """The values of the options given, before anything is built or written (``nldsl ablate
    --run`` checks its options with it before writing a variant)."""
    for name, want, ok in _OPTION_RULES:
        v = getattr(args, name, None)
        if v is not None and not ok(v):
            raise _Usage(f"--{name.replace('_', '-')} must be {want}, got {v}")


def config_from_args(args):
    """RunConfig from the parsed arguments, with the preset's values where flags are unset."""
    import torch

    from nldsl.train.build import BuildError, parse_overrides
    from nldsl.train.config import PRESETS, RunConfig, preset_threads

    check_options(args)
    try:
        overrides = parse_overrides(args.overrides)
    except BuildError as e:
        raise _Usage(str(e)) from None
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    preset_name = args.preset or ("full" if gpu else "cpu-demo")
    preset = PRESETS[preset_name]
    model_kw = dict(preset["model"])
    model_kw.update(preset.get("task_model", {}).get(args.task.strip().lower(), {}))
    model_kw.update(overrides)

    def pick(name):
        v = getattr(args, name, None)
        return v if v is not None else preset.get(name)

    if args.resume and args.overwrite:
        raise _Usage("--resume and --overwrite contradict each other")
    if args.time_limit is not None:
        time_limit = args.time_limit if args.time_limit > 0 else None
    else:  # the preset's budget holds only while the user left the number of steps to it
        time_limit = preset.get("time_limit") if args.steps is None else None
    out = Path(args.out) if args.out else _default_out(args.spec, args.task, args.resume)
    cfg = RunConfig(
        spec=args.spec, model=args.model_name, overrides=model_kw, task=args.task.strip().lower(),
        phases=args.phases, pairs=pick("pairs"), needles=args.needles, data=args.data,
        seq_len=pick("seq_len"), batch=pick("batch"), steps=pick("steps"), lr=pick("lr"),
        warmup=pick("warmup"), schedule=args.schedule, weight_decay=args.weight_decay, clip=args.clip,
        eval_every=pick("eval_every"), eval_seqs=pick("eval_seqs"), log_every=pick("log_every"),
        ckpt_every=args.ckpt_every, keep=args.keep, seed=args.seed, device=args.device,
        dtype=args.dtype, out=str(out), resume=args.resume, carry_state=args.carry_state,
        segments=args.segments, fsdp=args.fsdp, time_limit=time_limit,
        threads=args.threads if args.threads is not None else preset_threads(preset.get("threads")),
        progress=args.progress, plot=args.plot, preset=preset_name)
    if args.out and not args.resume and not args.overwrite and _holds_run(out):
        raise _Usage(f"{out} already holds a run; continue it with --resume, or start over with --overwrite")
    return cfg


def _err(msg: str) -> None:
    print(f"nldsl: error: {msg}", file=sys.stderr)


def render_spec_error(e) -> None:
    """A SpecError's diagnostics on stderr, at the spec's text (``nldsl sample`` prints them too)."""
    color = hasattr(sys.stderr, "isatty") and sys.stderr.isatty() and "NO_COLOR" not in os.environ
    try:
        text = e.render(color=color)
    except Exception:
        text = str(e)
    print(text, file=sys.stderr)


def _start_over(out: Path) -> None:
    for name in ("checkpoints",):
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    for name in ("metrics.jsonl", "results.json", "curves.png", "run.json"):
        if (out / name).exists():
            (out / name).unlink()


def main_run(args) -> int:
    """The ``nldsl run`` command; returns the exit code."""
    from nldsl.diagnostics import SpecError

    try:
        cfg = config_from_args(args)
    except _Usage as e:
        _err(str(e))
        return EXIT_USAGE
    try:
        if args.overwrite and Path(cfg.out).is_dir():
            _start_over(Path(cfg.out))
        if args.nproc > 1:
            return _launch(cfg, args.nproc)
        return run_config(cfg)
    except SpecError as e:
        render_spec_error(e)
        return EXIT_FAILED
    except OSError as e:
        _err(f"{getattr(e, 'filename', None) or cfg.out}: {e.strerror or e}")
        return EXIT_USAGE


def run_config(cfg, *, child: bool = False, callbacks=()) -> int:
    """Trains ``cfg`` in this process (one rank when started by torchrun); prints the results."""
    from nldsl.diagnostics import SpecError
    from nldsl.train.loop import RunError, train
    from nldsl.train.report import format_table

    rank = int(os.environ.get("RANK", "0"))
    previous = _terminate_as_interrupt()
    try:
        res = train(cfg, callbacks)
    except RunError as e:
        if rank == 0:
            _err(str(e))
            if child:
                _child_status(cfg, e.code, str(e))
        return EXIT_OK if child else e.code
    except SpecError as e:
        if rank == 0:
            render_spec_error(e)
            if child:
                _child_status(cfg, EXIT_FAILED, str(e))
        return EXIT_OK if child else EXIT_FAILED
    finally:
        _restore_terminate(previous)
    if rank == 0:
        print(format_table(res), flush=True)
        if res.message:
            level = "error" if res.exit_code in (EXIT_FAILED, EXIT_USAGE) else "note"
            print(f"nldsl: {level}: {res.message}", file=sys.stderr, flush=True)
    return EXIT_OK if child else res.exit_code


def _terminate_as_interrupt():
    """SIGTERM (a scheduler's preemption, torchrun stopping ranks) saves like Ctrl-C does."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return None


def _restore_terminate(previous) -> None:
    import signal

    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except (ValueError, OSError):
            pass


def _child_status(cfg, code: int, message: str) -> None:
    from nldsl.train.checkpoint import atomic_write

    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(cfg.out) / "results.json",
                     json.dumps({"status": "error", "exit_code": code, "message": message}))
    except OSError:
        pass


def _launch(cfg, nproc: int) -> int:
    """Validates what can be checked once, then starts ``nproc`` ranks under torchrun."""
    import torch

    from nldsl.train import distributed as D
    from nldsl.train.build import BuildError, build_model
    from nldsl.train.checkpoint import atomic_write
    from nldsl.train.loop import RunError, prepare_out, resolve_device
    from nldsl.train.tasks import TaskError, make_task

    try:
        device = resolve_device(cfg.device)
        if device.type == "cuda" and torch.cuda.device_count() < nproc:
            raise RunError(f"--nproc {nproc}: only {torch.cuda.device_count()} CUDA device(s) here")
        if cfg.batch % nproc:
            raise RunError(f"--batch {cfg.batch} cannot be split evenly over {nproc} processes")
        with torch.device("meta"):  # check the model builds at this size, without allocating it
            _, info = build_model(cfg.spec, cfg.overrides, name=cfg.model)
        make_task(cfg.task, vocab=info.get("vocab") or 256, seq_len=cfg.seq_len or info.get("context") or 512,
                  seed=cfg.seed, steps=cfg.steps, pairs=cfg.pairs, needles=cfg.needles, data=cfg.data,
                  phases=cfg.phases)
        out = Path(cfg.out)
        prepare_out(out)
    except (RunError, BuildError, TaskError) as e:
        _err(str(e))
        return EXIT_USAGE
    if cfg.threads and device.type == "cpu":  # the ranks share the cores
        cfg.threads = max(1, min(cfg.threads, (os.cpu_count() or 1) // nproc))
    launch_file = out / "launch.json"
    results = out / "results.json"
    try:
        if results.exists():
            results.unlink()
        atomic_write(launch_file, json.dumps(cfg.to_dict(), indent=1))
    except OSError as e:
        _err(f"cannot write to the output folder {out}: {e.strerror or e}")
        return EXIT_USAGE
    pid_dir = out / ".ranks"
    shutil.rmtree(pid_dir, ignore_errors=True)
    try:
        rc = D.launch([FROM_CONFIG, str(launch_file)], nproc, pid_dir)
    finally:
        shutil.rmtree(pid_dir, ignore_errors=True)
    try:
        status = json.loads(results.read_text())
        return int(status.get("exit_code", EXIT_USAGE))
    except (OSError, ValueError):
        if rc != 0:
            _err(f"a worker process failed (torchrun exit status {rc}); see its messages above")
            return EXIT_USAGE
        return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nldsl run", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def check_argv(options: list[str]) -> None:
    """Parses and checks options of ``nldsl run`` given without a spec (``nldsl ablate --run``'s);
    raises SystemExit (argparse, having printed why) or ``_Usage``."""
    check_options(_parser().parse_intermixed_args(["SPEC", *options]))


def main(argv: list[str] | None = None) -> int:
    """``python -m nldsl.run_cmd``: the ``run`` command alone (and the entry point of ranks)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == FROM_CONFIG:  # a rank started by --nproc
        from nldsl.train.config import RunConfig

        from nldsl.train.distributed import record_pid

        record_pid()
        cfg = RunConfig.from_dict(json.loads(Path(argv[1]).read_text()))
        try:
            return run_config(cfg, child=True)
        except KeyboardInterrupt:  # before or after training: nothing to save
            if os.environ.get("RANK", "0") == "0":
                print("nldsl: interrupted", file=sys.stderr)
                _child_status(cfg, EXIT_INTERRUPTED, "interrupted")
            return EXIT_OK
    try:
        args = _parser().parse_intermixed_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        return main_run(args)
    except KeyboardInterrupt:
        print("nldsl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
