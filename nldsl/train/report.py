"""What a run leaves for people: the results table printed on exit, results.json, the plot."""
from __future__ import annotations

import shlex
from pathlib import Path

METRIC_NAMES = {"acc": "accuracy", "bpb": "bits/byte"}


def results_dict(res) -> dict:
    return {
        "status": res.status, "exit_code": res.exit_code, "message": res.message, "step": res.step,
        "model": res.info, "task": res.task, "metric": res.metric, "chance": res.chance,
        "context_chance": res.context_chance,
        "final": res.final, "stream": res.stream, "continual": res.continual,
        "checkpoint": res.checkpoint, "elapsed_s": res.elapsed, "tokens_per_s": res.tokens_per_s,
        "device": res.device, "dtype": res.dtype, "world": res.world, "notes": res.notes,
    }


def _fmt(v, metric=None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if metric in ("acc",) else f"{v:.4f}"
    return str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _pick(rows: list, limit: int) -> list:
    if len(rows) <= limit:
        return rows
    idx = sorted({round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)})
    return [rows[i] for i in idx]


def format_table(res) -> str:
    info = res.info or {}
    m = res.metric
    out = []
    params = info.get("parameters")
    head = f"{info.get('class', '?')} on {res.task}: {res.step} steps"
    if params:
        head += f", {params / 1e6:.2f}M parameters"
    head += f", {res.device} {res.dtype}"
    if res.world > 1:
        head += f", {res.world} processes"
    head += f", {res.elapsed:.1f} s"
    out.append(head)
    evals = [r for r in res.rows if "eval_loss" in r]
    if evals:
        rows = [[str(r["step"]), _fmt(r.get("loss_avg", r["loss"])), _fmt(r["eval_loss"]), _fmt(r.get(m), m)]
                for r in _pick(evals, 10)]
        col = METRIC_NAMES.get(m, m)
        if res.continual:
            col += f" ({res.continual['phases'][0]})"
        out += ["  " + x for x in _table(["step", "train loss", "eval loss", col], rows)]
    if res.final and m in res.final:
        at = res.final.get("step")
        when = "final" if at == res.step else f"last evaluated (step {at})"
        fin = f"{when} {METRIC_NAMES.get(m, m)}: {res.final[m]:.4f}"
        if res.chance:
            fin += f" (chance {res.chance:.4f}"
            if res.context_chance:
                fin += f"; a random value from the context: {res.context_chance:.4f}"
            fin += ")"
        fin += f", eval loss {res.final.get('eval_loss', float('nan')):.4f}"
        if res.tokens_per_s:
            fin += f", {res.tokens_per_s:,.0f} tokens/s"
        out.append(fin)
    if res.continual and res.continual.get("after"):
        c = res.continual
        names = c["phases"]
        header = ["after phase"] + [f"{n} ({c['metrics'][j]})" for j, n in enumerate(names)]
        rows = []
        for i, vals in enumerate(c["after"]):
            rows.append([f"{i}: {names[i]}"] + [_fmt(v, c["metrics"][j]) for j, v in enumerate(vals)]
                        + ["-"] * (len(names) - len(vals)))
        out.append("continual learning (each phase evaluated after every later one):")
        out += ["  " + x for x in _table(header, rows)]
        forget = forgetting(c)
        if forget:
            out.append("forgetting (right after its own phase minus at the end; bits/byte: the increase): "
                       + ", ".join(f"{names[j]} {v:+.3f}" for j, v in forget.items()))
    if res.stream:
        s = res.stream
        modes = list(s["modes"])
        rows = []
        for i in range(s["segments"]):
            rows.append([str(i)] + [_fmt(s["modes"][mode][i][m], m) for mode in modes])
        out.append(f"streaming evaluation, {METRIC_NAMES.get(m, m)} by segment of {s['seg_len']} tokens "
                   f"(carry: state passed back across calls; reset: each call starts fresh):")
        out += ["  " + x for x in _table(["segment"] + modes, rows)]
    for note in res.notes:
        out.append(f"note: {note}")
    if res.files:
        out.append("wrote: " + ", ".join(res.files))
    if res.checkpoint:
        out.append(f"checkpoint: {res.checkpoint}")
        if res.task.startswith("lm "):  # a model of text (the task as described): show what it writes
            out.append(f"sample it: nldsl sample {shlex.quote(str(res.out))}   (--prompt TEXT: start from your text)")
    return "\n".join(out)


def forgetting(c: dict) -> dict[int, float]:
    """Per earlier phase j: its metric right after phase j minus its metric at the end
    (accuracy: a positive number is forgetting; bits per byte: the sign is flipped)."""
    after = c.get("after") or []
    if len(after) < 2:
        return {}
    out = {}
    for j in range(len(after) - 1):
        first, final = after[j][j], after[-1][j] if j < len(after[-1]) else None
        if first is None or final is None:
            continue
        out[j] = (first - final) if c["metrics"][j] == "acc" else (final - first)
    return out


def plot_run(res, path: Path) -> None:
    """Loss and metric curves (and per-segment streaming metrics) in one PNG, written atomically."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res.rows
    m = res.metric
    panels = 3 if res.stream else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8))
    ax = axes[0]
    ax.plot([r["step"] for r in rows], [r.get("loss_avg", r["loss"]) for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.set_title(f"{res.info.get('class', '')} on {res.task}", fontsize=9)
    ax = axes[1]
    keys = sorted({k for r in ev for k in r if k.startswith("phase") and k.endswith(("_acc", "_bpb"))})
    if keys:
        names = (res.continual or {}).get("phases", [])
        twin = None
        for k in keys:
            j = int(k[5:].split("_")[0])
            pts = [(r["step"], r[k]) for r in ev if k in r]
            target = ax
            if k.endswith("_bpb") and m != "bpb":  # bits per byte on their own axis
                twin = twin or ax.twinx()
                twin.set_ylabel("bits/byte")
                target = twin
            target.plot(*zip(*pts), "o-" if target is ax else "s--", markersize=3,
                        label=names[j] if j < len(names) else k)
        lines = ax.get_lines() + (twin.get_lines() if twin else [])
        ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
        ax.set_title("each phase's task, evaluated throughout", fontsize=9)
    elif ev:
        ax.plot([r["step"] for r in ev], [r.get(m) for r in ev], "o-")
    if res.chance and m == "acc":
        ax.axhline(res.chance, color="gray", ls="--", lw=1)
        ax.annotate("chance", (0.01, res.chance), xycoords=("axes fraction", "data"), fontsize=7,
                    color="gray", va="bottom")
    ax.set_xlabel("step")
    ax.set_ylabel(METRIC_NAMES.get(m, m))
    if res.stream:
        ax = axes[2]
        s = res.stream
        for mode, vals in s["modes"].items():
            ax.plot(range(s["segments"]), [v[m] for v in vals], "o-", label=mode)
        ax.set_xlabel(f"segment ({s['seg_len']} tokens each)")
        ax.set_ylabel(METRIC_NAMES.get(m, m))
        ax.set_title("streaming evaluation", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
