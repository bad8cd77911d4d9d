"""The study's report (tools/study.py): tables, figures and the claims table under docs/results/.

Files written:

* ``table.md`` / ``table.json``: every headline model and step count, each metric as
  the mean and the spread (min-max) over the sampling seeds;
* ``sweep.md``: every model at every step count (one seed; the figure's points);
* ``ablations.md``: the FMLM ablations at 1 and 4 steps;
* ``figure1.png``: Gen PPL against network evaluations and against seconds per
  sample, one line per method, each point labelled with its entropy (the paper's
  Figure 1); ``curves.png``: the teachers' training and validation losses;
* ``run.json``: the scale, commit, machine and every stage's wall time and command;
* ``README.md``: the claims table (each claim, the paper's number, ours, the verdict
  and the rule that gave it) and how to reproduce.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

METRICS = ("gen_ppl", "entropy", "mauve", "distinct_2", "sec_per_sample")
NAMES = {"flm_tau": "FLM (tau)", "flm_g_eq_t": "FLM (g = t)", "mdlm": "MDLM", "sdtt": "SDTT", "fmlm": "FMLM",
         "ar": "AR", "abl_s1w_none": "FMLM, stage-1 weighting none", "abl_s1w_st": "FMLM, stage-1 weighting w(s,t)",
         "abl_s2w_s": "FMLM, stage-2 weighting w(s)", "abl_s2w_st": "FMLM, stage-2 weighting w(s,t)",
         "abl_nobound": "FMLM, no boundary intervals"}


def _run_name(row: dict[str, Any]) -> str:
    """The study run a row comes from (its checkpoint's run directory), or "data"."""
    if row["kind"] == "data":
        return "data"
    return Path(row["checkpoint"]).parent.parent.name


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, steps) with mean, min and max of each metric over the seeds."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for res in results:
        for row in res["rows"]:
            groups.setdefault((_run_name(row), row["steps"]), []).append(row)
    out = []
    for (name, steps), rows in groups.items():
        entry = {"run": name, "method": NAMES.get(name, name), "kind": rows[0]["kind"], "steps": steps,
                 "nfe": rows[0]["nfe"], "seeds": len(rows)}
        for key in METRICS:
            values = [r[key] for r in rows if r.get(key) is not None]
            entry[key] = statistics.fmean(values) if values else None
            entry[f"{key}_min"] = min(values) if values else None
            entry[f"{key}_max"] = max(values) if values else None
        out.append(entry)
    return out


def _fmt(row: dict[str, Any], key: str, fmt: str) -> str:
    if row.get(key) is None:
        return "n/a"
    text = fmt.format(row[key])
    if row["seeds"] > 1 and row.get(f"{key}_min") is not None and row[f"{key}_max"] != row[f"{key}_min"]:
        text += f" ({fmt.format(row[f'{key}_min'])}-{fmt.format(row[f'{key}_max'])})"
    return text


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | steps | NFE | Gen PPL ↓ | entropy | MAUVE ↑ | dist-2 | s/sample |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps'] if r['steps'] is not None else 'n/a'} | "
                     f"{r['nfe'] if r['nfe'] is not None else 'n/a'} | {_fmt(r, 'gen_ppl', '{:.1f}')} | "
                     f"{_fmt(r, 'entropy', '{:.2f}')} | {_fmt(r, 'mauve', '{:.3f}')} | "
                     f"{_fmt(r, 'distinct_2', '{:.3f}')} | {_fmt(r, 'sec_per_sample', '{:.3g}')} |")
    return "\n".join(lines)


def _find(rows: list[dict[str, Any]], run: str, steps: int | None = None) -> dict[str, Any] | None:
    matching = [r for r in rows if r["run"] == run and (steps is None or r["steps"] == steps)]
    return max(matching, key=lambda r: r["steps"] or 0) if matching else None


def _separated(a: dict[str, Any], b: dict[str, Any], key: str = "gen_ppl") -> bool:
    """The two rows' seed ranges do not overlap (a single seed counts as a point)."""
    return a[f"{key}_max"] < b[f"{key}_min"] or b[f"{key}_max"] < a[f"{key}_min"]


def claims(rows: list[dict[str, Any]], sweep: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
    """Each claim of the paper with the paper's number, ours and a verdict by an explicit rule.

    ``rows``: the headline rows (several seeds); ``sweep``: every model at every step
    count (one seed), used for the claims about all step counts and the speed-up."""
    sweep = sweep or rows
    data = _find(rows, "data")
    teachers = [r for r in rows if r["run"] in ("flm_tau", "flm_g_eq_t", "mdlm", "ar") and r.get("gen_ppl") is not None]
    out: list[dict[str, str]] = []
    if data is None or data.get("gen_ppl") is None or not teachers:
        return [{"claim": "all", "paper": "", "ours": "Gen PPL not computed", "verdict": "cannot tell",
                 "rule": "the study ran without a Gen PPL scorer"}]
    # A low Gen PPL from repetitive text is not language (method.md): only rows whose
    # entropy is at least 90% of the data's count towards "the models are learning".
    fluent = [r for r in teachers if r["entropy"] >= 0.9 * data["entropy"]]
    best = min(fluent or teachers, key=lambda r: r["gen_ppl"])
    learning = bool(fluent) and best["gen_ppl"] <= 3 * data["gen_ppl"]
    scale_note = ("" if learning else f" -- at this scale the best non-degenerate many-step model "
                  f"({best['method']}, Gen PPL {best['gen_ppl']:.0f}, entropy {best['entropy']:.2f}) is not within 3x "
                  f"of the data's Gen PPL ({data['gen_ppl']:.0f}, entropy {data['entropy']:.2f}), so no model writes "
                  "language yet" if fluent else " -- at this scale every many-step model's entropy is below 90% of the "
                  "data's (degenerate text), so no model writes language yet")

    def verdict(holds: bool, separated: bool = True) -> str:
        if not learning:
            return "cannot tell at this scale"
        if not separated:
            return "cannot tell (within the seed spread)"
        return "holds" if holds else "does not hold"

    flm_rows = sorted((r for r in rows if r["run"] == "flm_tau"), key=lambda r: r["steps"])
    top = flm_rows[-1]["steps"] if flm_rows else None
    flm, mdlm = _find(rows, "flm_tau", top), _find(rows, "mdlm", top)
    if flm and mdlm:
        out.append({"claim": f"FLM matches MDLM at many steps ({top} steps)",
                    "paper": "1024 steps: FLM 96.9 vs MDLM 109.2 (LM1B), 62.2 vs 121.1 (OWT)",
                    "ours": f"FLM {flm['gen_ppl']:.1f} / entropy {flm['entropy']:.2f}, MDLM {mdlm['gen_ppl']:.1f} / "
                            f"{mdlm['entropy']:.2f}",
                    "verdict": verdict(flm["gen_ppl"] <= 1.1 * mdlm["gen_ppl"]) + scale_note,
                    "rule": "holds if FLM's mean Gen PPL is at most 1.1x MDLM's at the largest step count"})
    pairs = [(a, _find(sweep, "flm_g_eq_t", a["steps"]))
             for a in sorted((r for r in sweep if r["run"] == "flm_tau"), key=lambda r: r["steps"])]
    pairs = [(a, b) for a, b in pairs if b is not None and a.get("gen_ppl") and b.get("gen_ppl")]
    if pairs:
        better = [a["steps"] for a, b in pairs if a["gen_ppl"] < b["gen_ppl"]]
        out.append({"claim": "tau improves FLM at every step count",
                    "paper": "ablation: lower Gen PPL with tau at every step count",
                    "ours": f"lower with tau at {len(better)} of {len(pairs)} step counts ({better})",
                    "verdict": verdict(len(better) == len(pairs)) + scale_note,
                    "rule": "holds if the tau row's mean Gen PPL is lower at every step count of the sweep"})
    fmlm1, sdtt8 = _find(rows, "fmlm", 1), _find(rows, "sdtt", 8)
    if fmlm1 and sdtt8:
        out.append({"claim": "FMLM in 1 step beats distilled discrete diffusion (SDTT) in 8",
                    "paper": "FMLM 1 step: 104-119 (LM1B), 129-168 (OWT); distilled discrete diffusion degenerate "
                             "at 1 step",
                    "ours": f"FMLM 1 step {fmlm1['gen_ppl']:.1f} / entropy {fmlm1['entropy']:.2f}; SDTT 8 steps "
                            f"{sdtt8['gen_ppl']:.1f} / {sdtt8['entropy']:.2f}",
                    "verdict": verdict(fmlm1["gen_ppl"] < sdtt8["gen_ppl"]
                                       and fmlm1["entropy"] >= sdtt8["entropy"] - 0.1, _separated(fmlm1, sdtt8))
                    + scale_note,
                    "rule": "holds if FMLM-1's Gen PPL is lower and its entropy at most 0.1 nats lower, with the "
                            "seed ranges of Gen PPL not overlapping"})
    if fmlm1:
        out.append({"claim": "FMLM in 1 step keeps entropy near the data's",
                    "paper": "LM1B data 4.3, OWT 5.4; FMLM close",
                    "ours": f"FMLM 1 step {fmlm1['entropy']:.2f}, data {data['entropy']:.2f}",
                    "verdict": verdict(fmlm1["entropy"] >= 0.9 * data["entropy"]) + scale_note,
                    "rule": "holds if FMLM-1's mean entropy is at least 90% of the data row's"})
        sdtt_rows = sorted((r for r in sweep if r["run"] == "sdtt" and r.get("gen_ppl") is not None),
                           key=lambda r: r["steps"])
        fmlm1 = _find(sweep, "fmlm", 1) or fmlm1
        reach = [r for r in sdtt_rows if r["gen_ppl"] <= fmlm1["gen_ppl"]]
        if reach and fmlm1.get("sec_per_sample"):
            speed = reach[0]["sec_per_sample"] / fmlm1["sec_per_sample"]
            ours = (f"SDTT needs {reach[0]['steps']} steps to reach FMLM-1's Gen PPL: {speed:.1f}x the time "
                    "per sample")
        else:
            speed = None
            ours = f"SDTT does not reach FMLM-1's Gen PPL ({fmlm1['gen_ppl']:.1f}) within {sdtt_rows[-1]['steps'] if sdtt_rows else 0} steps"
        out.append({"claim": "speed-up at equal quality over distilled discrete diffusion",
                    "paper": "about 8.3x (LM1B)", "ours": ours,
                    "verdict": verdict(speed is None or speed > 1) + scale_note,
                    "rule": "holds if SDTT needs more time per sample than FMLM-1 to reach FMLM-1's Gen PPL (sweep)"})
    return out


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    data = _find(rows, "data")
    for run in ("flm_tau", "flm_g_eq_t", "mdlm", "sdtt", "fmlm", "ar"):
        series = sorted((r for r in rows if r["run"] == run and r.get("gen_ppl") is not None), key=lambda r: r["nfe"])
        if not series:
            continue
        for ax, key in zip(axes, ("nfe", "sec_per_sample")):
            xs, ys = [r[key] for r in series], [r["gen_ppl"] for r in series]
            ax.plot(xs, ys, "o-", label=NAMES.get(run, run))
            for r, x, y in zip(series, xs, ys):
                ax.annotate(f"{r['entropy']:.1f}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for ax, label in zip(axes, ("network evaluations", "seconds per sample")):
        if data and data.get("gen_ppl"):
            ax.axhline(data["gen_ppl"], color="k", ls="--", lw=1, label=f"data ({data['gen_ppl']:.0f})")
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="Gen PPL (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Gen PPL against cost; numbers next to points: unigram entropy (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curves(runs: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in ("flm_tau", "flm_g_eq_t", "mdlm", "ar"):
        metrics = runs / run / "metrics.jsonl"
        if not metrics.is_file():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
        val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
        line, = ax.plot(*zip(*train), lw=1, label=f"{NAMES[run]} train") if train else (None,)
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color() if line else None, label=f"{NAMES[run]} val")
    ax.set(xlabel="step", ylabel="loss (nats / token; MDLM: NELBO)", title="teachers of the study")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict[str, Any]:
    import os

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"commit": commit, "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def write_report(runs: Path, docs: Path, scale: str, timings: dict[str, Any]) -> dict[str, Path]:
    """Write every file of the report; a missing evaluation leaves its files out."""
    docs.mkdir(parents=True, exist_ok=True)
    seeds = sorted(runs.glob("eval/seed*/results.json"))
    headline = aggregate([json.loads(p.read_text()) for p in seeds])
    ablation_path = runs / "eval" / "ablations" / "results.json"
    ablations = aggregate([json.loads(ablation_path.read_text())]) if ablation_path.is_file() else []
    sweep_path = runs / "eval" / "sweep" / "results.json"
    sweep_results = json.loads(sweep_path.read_text()) if sweep_path.is_file() else None
    sweep = aggregate([sweep_results]) if sweep_results else []
    first = json.loads(seeds[0].read_text()) if seeds else {}
    found = claims(headline, sweep) if headline else []
    paths = {"table.json": docs / "table.json", "table.md": docs / "table.md", "sweep.md": docs / "sweep.md",
             "ablations.md": docs / "ablations.md",
             "run.json": docs / "run.json", "README.md": docs / "README.md"}
    paths["table.json"].write_text(json.dumps({"scale": scale, "rows": headline, "sweep": sweep,
                                               "ablations": ablations, "claims": found}, indent=2))
    caption = (f"Scorer {first.get('scorer')}, MAUVE embedder {first.get('embedder')} with "
               f"{first.get('mauve_clusters')} clusters; {first.get('num_samples')} samples of "
               f"{first.get('seq_len')} tokens per row and seed; {len(seeds)} seed(s), spread = min-max over seeds.")
    paths["table.md"].write_text(f"**{caption}**\n\n{markdown_table(headline)}\n")
    paths["sweep.md"].write_text(f"**Every model at every step count: seed 0, "
                                 f"{(sweep_results or {}).get('num_samples')} samples per row.**\n\n"
                                 + markdown_table(sweep) + "\n")
    paths["ablations.md"].write_text("**FMLM ablations against the same teacher (seed 0).**\n\n"
                                     + markdown_table(ablations) + "\n")
    total = sum(t["seconds"] for t in timings.values())
    paths["run.json"].write_text(json.dumps({"scale": scale, **_machine(), "total_seconds": round(total, 1),
                                             "stages": timings}, indent=2))
    try:
        _plot(sweep or headline, docs / "figure1.png")
        _curves(runs, docs / "curves.png")
        paths["figure1.png"], paths["curves.png"] = docs / "figure1.png", docs / "curves.png"
    except ImportError:  # matplotlib is in the eval extra
        pass
    lines = [f"# The paper's claims, measured at the `{scale}` scale", "",
             "Produced by `python tools/study.py --scale " + scale + "` (resumable: re-running skips finished "
             "stages). Headline table: [table.md](table.md), every step count: [sweep.md](sweep.md), ablations: [ablations.md](ablations.md), figure: "
             "[figure1.png](figure1.png), teacher curves: [curves.png](curves.png), commands, commit, machine and "
             "wall times: [run.json](run.json).", "",
             f"Total wall time: {total / 60:.1f} min.", "",
             "| claim | paper | ours | verdict | rule |", "|---|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['paper']} | {c['ours']} | {c['verdict']} | {c['rule']} |" for c in found]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v['seconds']}" for k, v in timings.items())]
    paths["README.md"].write_text("\n".join(lines) + "\n")
    return paths
