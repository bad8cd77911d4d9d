"""Files of an evaluation (``run/eval.py``): results.json, results.md and results.png.

Everything here works on the ``results`` dict that ``run/eval.py`` builds:
top-level settings (``scorer``, ``embedder``, ``mauve_clusters``, ``reference``,
``seq_len``, ``num_samples``, ...) and ``rows``, one per model and step count
plus the data's own row (``kind == "data"``, ``steps`` None). A metric that was
not computed is None, shown as "n/a". The plot needs matplotlib (eval extra).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA_KIND = "data"

# (header, row key, format) of the table's columns, in order.
COLUMNS = (
    ("model", "model", "{}"),
    ("kind", "kind", "{}"),
    ("steps", "steps", "{}"),
    ("NFE", "nfe", "{}"),
    ("Gen PPL ↓", "gen_ppl", "{:.1f}"),
    ("entropy", "entropy", "{:.2f}"),
    ("MAUVE ↑", "mauve", "{:.3f}"),
    ("dist-1", "distinct_1", "{:.3f}"),
    ("dist-2", "distinct_2", "{:.3f}"),
    ("dist-3", "distinct_3", "{:.3f}"),
    ("s/sample", "sec_per_sample", "{:.3g}"),
    ("tokens/s", "tokens_per_sec", "{:,.0f}"),
)


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def caption(results: dict[str, Any]) -> str:
    """Which scorer, embedder and reference every number of the table comes from."""
    ref = results["reference"]
    mauve = (f"MAUVE on {results['embedder']} embeddings, {results['mauve_clusters']} clusters, against "
             f"{ref['mauve_windows']} windows of `{ref['split']}`" if results["embedder"] else "MAUVE: not computed")
    protocol = {"flm": "flm protocol: each document scored from the document-start token",
                "paper": "paper protocol: whole samples, first token unscored, batches of 8"}.get(
        results.get("gen_ppl_protocol", "flm"), results.get("gen_ppl_protocol"))
    gen_ppl = (f"Gen PPL scored by {results['scorer']} ({protocol})" if results["scorer"]
               else "Gen PPL: not computed")
    k = results.get("prompt_tokens", 0)
    mode = (f"Completions of {k}-token held-out prompts: every metric scores the {results['seq_len'] - k} generated "
            f"tokens, MAUVE against the prompts' true continuations, the data row other windows' continuations. "
            if k else "")
    return (f"{mode}{gen_ppl}; {mauve}. "
            f"{results['num_samples']} samples of {results['seq_len']} tokens per model row; "
            f"the data row scores {ref['row_windows']} other windows of `{ref['split']}` of {ref['dataset']}. "
            f"Entropy: mean per-sample unigram entropy of the token ids (nats). s/sample: generation "
            f"device-seconds per sample (batch {results['batch_size']}, {results['world_size']} rank(s) on "
            f"{results['device']}).")


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table with its caption above."""
    lines = [f"**{caption(results)}**", "",
             "| " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if key in ("model", "kind") else "---:" for _, key, _ in COLUMNS) + "|"]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _plot_panel(ax: Any, results: dict[str, Any], x_key: str, y_key: str) -> None:
    """One metric against one x (steps or seconds per sample): a line per model, the data as a level."""
    models = [row for row in results["rows"] if row["kind"] != DATA_KIND]
    names = list(dict.fromkeys(row["model"] for row in models))
    plotted = False
    for color, name in enumerate(names):
        rows = sorted((r for r in models if r["model"] == name and r[y_key] is not None), key=lambda r: r["steps"])
        if not rows:
            continue
        xs, ys = [r[x_key] for r in rows], [r[y_key] for r in rows]
        ax.plot(xs, ys, marker="o", color=f"C{color}", label=name)
        if x_key != "steps":  # name each point's step count
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(str(r["steps"]), (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8, color=f"C{color}")
        plotted = True
    for row in results["rows"]:
        if row["kind"] == DATA_KIND and row[y_key] is not None:
            ax.axhline(row[y_key], color="0.4", linestyle="--", label=row["model"])
    if not plotted:
        ax.text(0.5, 0.5, "not computed", transform=ax.transAxes, ha="center", va="center", color="0.5")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)


def _plain_log_axis(axis: Any) -> None:
    """Log ticks labelled as matplotlib chooses (minor ones too on short ranges), as plain numbers."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter())


def _steps_axis(axis: Any, steps: list[int]) -> None:
    """A log axis with one labelled tick per evaluated step count."""
    from matplotlib.ticker import FixedFormatter, NullFormatter

    axis.set_ticks(steps)
    axis.set_major_formatter(FixedFormatter([str(n) for n in steps]))
    axis.set_minor_formatter(NullFormatter())


def plot(results: dict[str, Any], path: str | Path) -> Path:
    """Gen PPL (top, log) and MAUVE (bottom) against step count (left) and wall time per sample (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({row["steps"] for row in results["rows"] if row["kind"] != DATA_KIND})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for (y_key, y_label), ax_row in zip((("gen_ppl", "Gen PPL ↓"), ("mauve", "MAUVE ↑")), axes):
        for x_key, ax in zip(("steps", "sec_per_sample"), ax_row):
            _plot_panel(ax, results, x_key, y_key)
            ax.set_ylabel(y_label)
        _steps_axis(ax_row[0].xaxis, steps)
        _plain_log_axis(ax_row[1].xaxis)
        ax_row[0].set_xlabel("sampling steps")
        ax_row[1].set_xlabel("wall time per sample (s); points labelled with their steps")
    if any(row["gen_ppl"] is not None for row in results["rows"]):
        for ax in axes[0]:
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
    for ax in axes[1]:
        ax.set_ylim(-0.02, 1.02)
    labelled = [ax for ax in axes.flat if ax.get_legend_handles_labels()[0]]
    if labelled:
        labelled[0].legend(fontsize=8)
    mauve = f"{results['embedder']} ({results['mauve_clusters']} clusters)" if results["embedder"] else "not computed"
    fig.suptitle(f"Gen PPL: {results['scorer'] or 'not computed'} · MAUVE: {mauve} · {results['num_samples']} "
                 f"samples × {results['seq_len']} tokens · dashed: held-out `{results['reference']['split']}` text",
                 fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths
