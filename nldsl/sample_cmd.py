"""``nldsl sample RUN [options]``: continue a prompt with a trained model, token by token.

RUN is the output folder of ``nldsl run`` (its newest complete checkpoint is used) or one
checkpoint folder in it. The model is rebuilt from the run's spec and settings and the
checkpoint's weights; the spec must still compile to the model the run trained. A text prompt is
read as UTF-8 bytes (the ``lm`` task's tokens); ``--ids`` gives token ids instead, for models
trained on other tasks. Sampling: :mod:`nldsl.nn.sampling`.

Exit codes: 0 done, 1 the spec no longer checks, 2 usage or I/O problems, 130 interrupted.
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
TEXT_VOCAB = 256  # a byte per token

EPILOG = """\
examples:
  nldsl run specs/gated_deltanet.nl --task lm --out runs/gdn-lm
  nldsl sample runs/gdn-lm --prompt "def " --tokens 300
  nldsl sample runs/gdn-lm --prompt "import " --temperature 0     the likeliest token every time
  nldsl sample runs/hope-mqar --ids "3 17 3"                       token ids, for non-text tasks
"""


class _Usage(Exception):
    pass


def build_subparser(sub) -> argparse.ArgumentParser:
    """Registers ``sample`` on the CLI's subparsers."""
    p = sub.add_parser("sample", help="continue a prompt with a trained model",
                       description="Continue a prompt with the model a `nldsl run` trained, token by token, "
                                   "its in-context state carried.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=main_sample)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run's output folder (its newest checkpoint) or a checkpoint folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue, read as UTF-8 bytes (default: a newline)")
    src.add_argument("--prompt-file", dest="prompt_file", metavar="FILE",
                     help="continue this file's bytes (a long context the memories read first, say); "
                          "the continuation alone is printed")
    src.add_argument("--ids", help="token ids to continue instead, separated by spaces or commas")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--samples", type=int, default=1, help="continuations of the prompt, drawn side by side")
    p.add_argument("--temperature", type=float, default=0.8, help="0: the likeliest token every time (default 0.8)")
    p.add_argument("--top-k", type=int, dest="top_k", help="draw among the k likeliest tokens only")
    p.add_argument("--top-p", type=float, dest="top_p",
                   help="draw among the likeliest tokens whose probability reaches p (nucleus sampling)")
    p.add_argument("--no-learn", action="store_false", dest="learn",
                   help="memories that learn from surprise do not learn from the prompt either")
    p.add_argument("--spec", metavar="FILE",
                   help="the run's spec at another path (its text must be the run's; default: the path the run "
                        "was given)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _err(msg: str) -> None:
    print(f"nldsl: error: {msg}", file=sys.stderr)


def find_checkpoint(run: Path) -> tuple[Path, dict]:
    """``(checkpoint folder, its state.json)`` for a run folder or a checkpoint folder."""
    from nldsl.train import checkpoint as ckpt

    if not run.exists():
        raise _Usage(f"{run}: no such folder")
    if (run / ckpt.STATE_FILE).exists():
        meta = ckpt.verify(run)
        if meta is None:
            raise _Usage(f"{run}: the checkpoint is incomplete or damaged (a file is missing or does not match "
                         f"its sha256); give the run's folder to use its newest complete checkpoint")
        return run, meta
    if not (run / "checkpoints").is_dir():
        raise _Usage(f"{run}: not a run folder (no checkpoints/ in it); give the --out folder of `nldsl run`, "
                     f"or one of its checkpoints/step_* folders")
    found = ckpt.find_latest(run / "checkpoints")
    if found is None:
        raise _Usage(f"{run}: no complete checkpoint in {run / 'checkpoints'}")
    return found


def load_model(folder: Path, meta: dict, device, spec: str | None = None):
    """The run's model with the checkpoint's weights, on ``device``, in the weights' dtype
    (``spec``: the run's spec file at another path)."""
    from nldsl.train import checkpoint as ckpt
    from nldsl.train.build import BuildError, build_model, model_changed

    config = meta.get("config") or {}
    given = spec is not None
    spec = spec or config.get("spec")
    if not spec:
        raise _Usage(f"{folder}: state.json names no spec; give it with --spec")
    overrides = dict(config.get("overrides") or {})
    if overrides.get("impl") == "triton" and device.type != "cuda":
        # the generated kernels run on CUDA; the PyTorch ops compute the same with the same weights
        overrides["impl"] = "chunked"
        print(f"nldsl: note: {folder} trained with impl='triton'; on {device.type} its memories run the PyTorch "
              "ops (impl='chunked', the same computation)", file=sys.stderr)
    try:
        model, info = build_model(spec, overrides, name=config.get("model"))
    except BuildError as e:
        where = "" if given else (" (the path the run was given, relative to the folder it was started from; "
                                  "--spec FILE gives another)")
        raise _Usage(f"cannot rebuild the model of {folder}: {e}{where}") from None
    # as `nldsl run --resume` does: the weights belong to the model of the spec's text as it was
    changed = model_changed(meta, info)
    if changed == "spec":
        raise _Usage(f"{spec} changed since {folder} was written, so it may no longer build the model that was "
                     f"trained; sample with the spec as it was then (from version control), or train the new one")
    if changed == "defaults":
        raise _Usage(f"{spec} builds another model with this version of nldsl than when {folder} was written "
                     f"(a default differs; `nldsl fmt --resolved` shows the spec's); sample with that version")
    weights, _, _ = ckpt.load_checkpoint(folder)
    dtype = next(iter(weights.values())).dtype if weights else None
    model.to(device=device, dtype=dtype)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise _Usage(f"{folder} does not fit the model its spec builds now: {e}") from None
    return model, config


def trained_on_text(config: dict) -> bool:
    """Whether the run trained on bytes of text: the lm task, or a continual run with an lm phase."""
    from nldsl.train.tasks import DEFAULT_PHASES

    task = config.get("task")
    phases = (config.get("phases") or DEFAULT_PHASES).split(",")
    return task == "lm" or task == "continual" and any(p.strip().split(":")[0] == "lm" for p in phases)


def prompt_ids(args, vocab: int, text: bool = True) -> list[int]:
    """The prompt as token ids: ``--ids``, else the bytes of ``--prompt-file`` or of ``--prompt``
    in UTF-8 (a newline by default) for a model of ``text``."""
    if args.ids is not None:
        parts = args.ids.replace(",", " ").split()
        if not parts:
            raise _Usage("--ids is empty; give at least one token id")
        try:
            ids = [int(p) for p in parts]
        except ValueError:
            raise _Usage(f"--ids must be integers separated by spaces or commas, got {args.ids!r}") from None
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise _Usage(f"--ids: token {bad[0]} is outside the model's vocabulary of {vocab} (ids 0 to {vocab - 1})")
        return ids
    if not text:
        raise _Usage(f"this model was not trained on text (a vocabulary of {vocab} tokens): give its prompt as "
                     f"token ids with --ids")
    if args.prompt_file is not None:
        data = Path(args.prompt_file).read_bytes()  # an OSError is reported with the file's name
        if not data:
            raise _Usage(f"--prompt-file {args.prompt_file} is empty; give at least one byte")
    else:
        prompt = "\n" if args.prompt is None else args.prompt
        if not prompt:
            raise _Usage("--prompt is empty; give at least one character")
        data = prompt.encode("utf-8")
    return list(data)


def _check(args) -> None:
    for name, ok, want in (("tokens", args.tokens >= 0, "0 or more"), ("samples", args.samples >= 1, "at least 1")):
        if not ok:
            raise _Usage(f"--{name} must be {want}, got {getattr(args, name)}")


def main_sample(args) -> int:
    import torch

    from nldsl.diagnostics import SpecError
    from nldsl.nn.sampling import check_sampling
    from nldsl.run_cmd import render_spec_error
    from nldsl.train.checkpoint import CheckpointError
    from nldsl.train.loop import RunError, resolve_device

    try:
        _check(args)
        try:
            device = resolve_device(args.device)
        except RunError as e:
            raise _Usage(str(e)) from None
        folder, meta = find_checkpoint(Path(args.run))
        model, config = load_model(folder, meta, device, args.spec)
        vocab = model.config.vocab
        try:
            check_sampling(args.temperature, args.top_k, args.top_p, vocab, label=lambda n: "--" + n.replace("_", "-"))
        except ValueError as e:
            raise _Usage(str(e)) from None
        ids = prompt_ids(args, vocab, text=trained_on_text(config) and vocab >= TEXT_VOCAB)
    except _Usage as e:
        _err(str(e))
        return EXIT_USAGE
    except SpecError as e:
        render_spec_error(e)
        return EXIT_FAILED
    except CheckpointError as e:
        _err(str(e))
        return EXIT_USAGE
    except OSError as e:
        _err(f"{getattr(e, 'filename', None) or args.run}: {e.strerror or e}")
        return EXIT_USAGE

    text = args.ids is None  # else prompt_ids refused a model not trained on text
    prompt = torch.tensor([ids] * args.samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    stream = args.samples == 1  # one continuation prints as it is drawn
    echo = [] if args.prompt_file is not None else ids  # a file's text is on disk already: not repeated
    line_start = [True]

    def show(tokens) -> None:
        if text:  # an id past a byte (a vocabulary over 256) as 0xFF, never valid UTF-8: shown as U+FFFD
            out.write(decoder.decode(bytes(t if t < TEXT_VOCAB else 0xFF for t in tokens)))
        else:
            out.write(("" if line_start[0] else " ") + " ".join(map(str, tokens)))
            line_start[0] = False
        out.flush()

    read_at = []  # when the first token is drawn: the prompt has been read

    def on_token(token) -> None:
        if not read_at:
            read_at.append(time.perf_counter())
        if stream:
            show([int(token[0])])

    start = time.perf_counter()
    if args.prompt_file is not None:
        print(f"nldsl: continuing {args.prompt_file} ({len(ids):,} bytes; the continuation alone follows)",
              file=sys.stderr)
    if stream and echo:
        show(echo)
    try:
        result = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, learn=args.learn, generator=generator, on_token=on_token)
    except KeyboardInterrupt:
        out.write("\n")
        print("nldsl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    end = time.perf_counter()
    read = (read_at[0] if read_at else end) - start
    if stream:
        if text:
            out.write(decoder.decode(b"", final=True))
        out.write("\n")
    else:
        for i, row in enumerate(result.tokens.tolist()):
            out.write(f"--- sample {i + 1} ---\n")
            decoder.reset()
            line_start[0] = True
            show(echo + row)
            out.write(decoder.decode(b"", final=True) + "\n" if text else "\n")
    out.flush()
    n, seconds = args.tokens * args.samples, end - start - read
    rate = f" ({n / seconds:,.0f} tokens/s)" if seconds > 0 and n else ""
    print(f"{type(model).__name__} at step {meta.get('step')} of {folder} (task {config.get('task')}): read "
          f"{len(ids) * args.samples:,} prompt tokens in {read:.2f} s, sampled {n:,} in {seconds:.2f} s{rate}",
          file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m nldsl.sample_cmd``: the ``sample`` command alone."""
    p = argparse.ArgumentParser(prog="nldsl sample", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    return main_sample(args)


if __name__ == "__main__":
    sys.exit(main())
