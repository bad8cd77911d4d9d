"""The small-scale study of the paper's claims: a plan of runs and a resumable driver.

    python tools/study.py --scale cpu            # the embedded corpus, 2 CPU cores
    python tools/study.py --scale gpu            # the same study with DiT-small, shortened

Every teacher (FLM with tau, FLM with g = t, MDLM, AR) trains with the same
backbone, tokenizer, data order, batch and step budget (configs/study/base.py);
then FMLM (stage 1 + stage 2) distils the FLM and SDTT rounds (N0 -> N0/2 -> ...
-> 8 steps) distil the MDLM with the same total distillation steps; FMLM
ablations vary the loss weighting per stage and the boundary probability. The
headline rows (FLM, MDLM and AR at many steps, FMLM at 1 and 4, SDTT at 8) are
evaluated with several sampling seeds and many samples; a sweep of every model
at every step count (one seed, fewer samples) gives the Figure-1 curves; the
ablations run at 1 and 4 steps. :mod:`flm.eval.study_report` turns the results into
the files under ``docs/results/``.

Each stage is a command with a file that marks it done (a final checkpoint's
COMPLETE marker, an evaluation's results.json): re-running skips finished
stages, and an interrupted training stage resumes from its last checkpoint. The
wall time of every stage is kept in ``<runs>/timings.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "study" / "base.py"


@dataclass(frozen=True)
class Scale:
    """The budget of one study size."""

    teacher_steps: int  # optimizer steps of every teacher
    distill_steps: int  # per FMLM stage; SDTT gets 2 x this in total over its rounds
    sdtt_start: int  # N0: the MDLM's step count distilled by the first SDTT round
    eval_steps: list[int]  # the sweep (every model at every count; the Figure-1 curves)
    many_steps: int  # the headline rows' step count for the many-step models (FLM, MDLM)
    num_samples: int  # per headline row and seed
    sweep_samples: int  # per sweep row (one seed)
    ablation_samples: int
    seeds: list[int]
    scorer: str = "smollm2"
    mauve: bool = True
    overrides: list[str] = field(default_factory=list)  # config overrides for every run
    distill_overrides: list[str] = field(default_factory=list)


SCALES = {
    # CI: seconds; exercises every stage and output, measures nothing.
    "toy": Scale(teacher_steps=2, distill_steps=2, sdtt_start=16, eval_steps=[1, 2], many_steps=4, num_samples=4,
                 sweep_samples=4, ablation_samples=4, seeds=[0, 1], scorer="none", mauve=False,
                 overrides=["--model.seq_len=32", "--model.dim=32", "--model.n_layers=2", "--model.n_heads=2",
                            "--model.cond_dim=16", "--batch_size=8", "--eval_batches=1", "--ckpt_every=2",
                            "--log_every=1", "--optim.warmup_steps=1", "--data.num_workers=0"],
                 distill_overrides=["--batch_size=4"]),
    # The embedded corpus on 2 CPU cores, within 90 minutes. Gen PPL scoring (about 0.085 s
    # per sample) and 256-step sampling (about 0.3 s per sample) dominate the evaluation,
    # so the sweep (42 rows) takes fewer samples than the 3-seed headline rows.
    "cpu": Scale(teacher_steps=1500, distill_steps=300, sdtt_start=64,
                 eval_steps=[1, 2, 4, 8, 16, 32, 64, 256], many_steps=64, num_samples=512, sweep_samples=96,
                 ablation_samples=256, seeds=[0, 1, 2],
                 distill_overrides=["--batch_size=32", "--optim.lr=1e-3", "--optim.warmup_steps=20",
                                    "--optim.schedule=constant", "--ckpt_every=100"]),
    # DiT-small (configs/lm1b_small.py's backbone) at a shortened budget, for one GPU.
    "gpu": Scale(teacher_steps=20000, distill_steps=4000, sdtt_start=256,
                 eval_steps=[1, 2, 4, 8, 16, 32, 64, 256], many_steps=256, num_samples=1024, sweep_samples=256,
                 ablation_samples=512, seeds=[0, 1, 2],
                 overrides=["--model.seq_len=128", "--model.dim=768", "--model.n_layers=12", "--model.n_heads=12",
                            "--model.cond_dim=128", "--model.dropout=0.1", "--batch_size=256",
                            "--dist.mixed_precision=bf16", "--dist.activation_checkpointing=selective",
                            "--optim.lr=3e-4", "--optim.warmup_steps=1000", "--ckpt_every=2000",
                            "--eval_every=2000"],
                 distill_overrides=["--batch_size=128", "--optim.warmup_steps=500", "--optim.schedule=constant"]),
}

TEACHERS = {  # name -> objective and overrides
    "flm_tau": ["--objective=flm"],
    "flm_g_eq_t": ["--objective=flm", "--flow.use_tau=false"],
    "mdlm": ["--objective=mdlm"],
    "ar": ["--objective=ar"],
}

# FMLM runs: name -> (stage, teacher run, stage-1 run or None, overrides). "fmlm" is the
# headline pair (the released choices: weighting w(s) then none, boundary 1/64 then 1/128).
FMLM = {
    "fmlm_s1": (1, "flm_tau", None, ["--distill.weighting=s", "--distill.boundary_prob=64"]),
    "fmlm": (2, "flm_tau", "fmlm_s1", ["--distill.weighting=none", "--distill.boundary_prob=128"]),
    # weighting of stage 1 (stage 2 as released)
    "abl_s1w_none_s1": (1, "flm_tau", None, ["--distill.weighting=none", "--distill.boundary_prob=64"]),
    "abl_s1w_none": (2, "flm_tau", "abl_s1w_none_s1", ["--distill.weighting=none", "--distill.boundary_prob=128"]),
    "abl_s1w_st_s1": (1, "flm_tau", None, ["--distill.weighting=st", "--distill.boundary_prob=64"]),
    "abl_s1w_st": (2, "flm_tau", "abl_s1w_st_s1", ["--distill.weighting=none", "--distill.boundary_prob=128"]),
    # weighting of stage 2 (stage 1 as released)
    "abl_s2w_s": (2, "flm_tau", "fmlm_s1", ["--distill.weighting=s", "--distill.boundary_prob=128"]),
    "abl_s2w_st": (2, "flm_tau", "fmlm_s1", ["--distill.weighting=st", "--distill.boundary_prob=128"]),
    # no forced (0, 1) intervals in either stage
    "abl_nobound_s1": (1, "flm_tau", None, ["--distill.weighting=s", "--distill.boundary_prob=0"]),
    "abl_nobound": (2, "flm_tau", "abl_nobound_s1", ["--distill.weighting=none", "--distill.boundary_prob=0"]),
}
ABLATIONS = ["fmlm", "abl_s1w_none", "abl_s1w_st", "abl_s2w_s", "abl_s2w_st", "abl_nobound"]
SWEEP = ["flm_tau", "flm_g_eq_t", "mdlm", "sdtt", "fmlm", "ar"]


def headline(many_steps: int) -> dict[str, list[int]]:
    """The headline rows (every seed): run -> its step counts (AR: its natural length)."""
    return {"flm_tau": [many_steps], "flm_g_eq_t": [many_steps], "mdlm": [many_steps], "ar": [many_steps],
            "fmlm": [1, 4], "sdtt": [8]}


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]
    done: Path  # exists once the stage has finished


def final_checkpoint(runs: Path, name: str, steps: int) -> Path:
    return runs / name / "checkpoints" / f"step_{steps:08d}"


def sdtt_rounds(start: int) -> list[int]:
    """The teacher step counts of the SDTT rounds: N0, N0/2, ..., 16 (the last student takes 8)."""
    rounds, n = [], start
    while n >= 16:
        rounds.append(n)
        n //= 2
    return rounds


def plan(scale: Scale, runs: Path, data: Path, vocab_size: int | None = None) -> list[Stage]:
    """Every stage of the study, in order (``vocab_size``: the dataset's, if not the base config's)."""
    train = [sys.executable, str(REPO / "run" / "train.py"), "--config", str(BASE_CONFIG), f"--data.path={data}",
             *scale.overrides, *([f"--model.vocab_size={vocab_size}"] if vocab_size else [])]
    stages = []
    for name, extra in TEACHERS.items():
        stages.append(Stage(name, train + extra + [f"--steps={scale.teacher_steps}", f"--out_dir={runs / name}"],
                            final_checkpoint(runs, name, scale.teacher_steps) / "COMPLETE"))
    distill = train + scale.distill_overrides + [f"--steps={scale.distill_steps}"]
    for name, (stage, teacher, stage1, extra) in FMLM.items():
        args = [f"--objective=fmlm_stage{stage}", f"--distill.teacher={final_checkpoint(runs, teacher, scale.teacher_steps)}",
                f"--out_dir={runs / name}", *extra]
        if stage1:
            args.append(f"--distill.stage1={final_checkpoint(runs, stage1, scale.distill_steps)}")
        stages.append(Stage(name, distill + args, final_checkpoint(runs, name, scale.distill_steps) / "COMPLETE"))
    rounds = sdtt_rounds(scale.sdtt_start)
    per_round = max(1, 2 * scale.distill_steps // len(rounds))  # equal total distillation budget
    teacher = final_checkpoint(runs, "mdlm", scale.teacher_steps)
    for i, n in enumerate(rounds):
        name = "sdtt" if i == len(rounds) - 1 else f"sdtt_round{i + 1}"
        stages.append(Stage(name, train + scale.distill_overrides + [
            "--objective=sdtt", f"--distill.teacher={teacher}", f"--distill.teacher_steps={n}",
            f"--steps={per_round}", f"--ckpt_every={per_round}", f"--out_dir={runs / name}"],
            final_checkpoint(runs, name, per_round) / "COMPLETE"))
        teacher = final_checkpoint(runs, name, per_round)
    finals = {s.name: s.done.parent for s in stages}
    evaluate = [sys.executable, str(REPO / "run" / "eval.py"), f"--scorer={scale.scorer}", f"--mauve={scale.mauve}",
                "--progress=false", f"--data={data}"]
    rows = ",".join(f"{finals[n]}@{'+'.join(map(str, counts))}" for n, counts in headline(scale.many_steps).items())
    for seed in scale.seeds:
        out = runs / "eval" / f"seed{seed}"
        stages.append(Stage(f"eval_seed{seed}", evaluate + [
            f"--checkpoints={rows}", f"--num_samples={scale.num_samples}", f"--seed={seed}", f"--out={out}"],
            out / "results.json"))
    out = runs / "eval" / "sweep"
    stages.append(Stage("eval_sweep", evaluate + [
        "--checkpoints=" + ",".join(str(finals[n]) for n in SWEEP),
        "--steps=" + ",".join(map(str, scale.eval_steps)), f"--num_samples={scale.sweep_samples}", "--seed=0",
        f"--out={out}"], out / "results.json"))
    out = runs / "eval" / "ablations"
    stages.append(Stage("eval_ablations", evaluate + [
        "--checkpoints=" + ",".join(str(finals[n]) for n in ABLATIONS), "--steps=1,4",
        f"--num_samples={scale.ablation_samples}", "--seed=0", f"--out={out}"], out / "results.json"))
    return stages


def run(scale: str = "cpu", runs: str = "runs/study", docs: str = "docs/results", data: str | None = None,
        report: bool = True) -> list[str]:
    """Run every unfinished stage of the study at ``scale``, then write the report to ``docs``.
    Returns the names of the stages run now."""
    if scale not in SCALES:
        raise ValueError(f"--scale={scale!r}: expected one of {sorted(SCALES)}")
    runs_dir, settings = Path(runs), SCALES[scale]
    data_dir = Path(data) if data else REPO / "data" / "shakespeare" / "tokens"
    if not (data_dir / "manifest.json").is_file():
        prepare_embedded_corpus(data_dir)
    timings_path = runs_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    ran = []
    from flm.data.shards import load_manifest

    for stage in plan(settings, runs_dir, data_dir, int(load_manifest(data_dir)["vocab_size"])):
        if stage.done.exists():
            continue
        print(f"[study] {stage.name}: {' '.join(stage.command[1:])}", flush=True)
        start = time.perf_counter()
        subprocess.run(stage.command, cwd=REPO, check=True)
        timings[stage.name] = {"seconds": round(time.perf_counter() - start, 1), "command": stage.command[1:]}
        timings_path.parent.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2))
        ran.append(stage.name)
    if report:
        from flm.eval.study_report import write_report

        write_report(runs_dir, Path(docs), scale, timings)
    return ran


def prepare_embedded_corpus(data_dir: Path) -> None:
    """Fetch the embedded Shakespeare corpus and pretokenize it as the quickstart does."""
    text = data_dir.parent / "text"
    subprocess.run([sys.executable, str(REPO / "tools" / "fetch_corpus.py"), "--out_dir", str(text)], check=True)
    subprocess.run([sys.executable, str(REPO / "tools" / "pretokenize.py"), str(text / "train"), str(data_dir),
                    "--val_inputs", str(text / "validation"), "--vocab_size", "1024"], check=True)
