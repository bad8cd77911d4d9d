"""The study driver end to end at toy size: every stage, every output file, and resuming."""

from __future__ import annotations

import json
import subprocess
import sys

from _synthetic import REPO, make_dataset, subprocess_env
from flm.eval.study_report import aggregate, claims
from flm.study import SCALES, plan, sdtt_rounds


def test_plan_gives_every_teacher_the_same_budget_and_sdtt_the_fmlm_budget(tmp_path):
    scale = SCALES["cpu"]
    stages = {s.name: s for s in plan(scale, tmp_path / "runs", tmp_path / "data")}
    for name in ("flm_tau", "flm_g_eq_t", "mdlm", "ar"):
        assert f"--steps={scale.teacher_steps}" in stages[name].command
    assert sdtt_rounds(64) == [64, 32, 16]
    sdtt = [s for s in stages.values() if "--objective=sdtt" in s.command]
    assert [c for s in sdtt for c in s.command if c.startswith("--distill.teacher_steps")] == [
        "--distill.teacher_steps=64", "--distill.teacher_steps=32", "--distill.teacher_steps=16"]
    sdtt_total = sum(int(c.split("=")[1]) for s in sdtt for c in s.command if c.startswith("--steps="))
    assert sdtt_total == 2 * scale.distill_steps  # the two FMLM stages' budget


def test_study_runs_end_to_end_and_resumes(tmp_path):
    dataset, _ = make_dataset(tmp_path)
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    cmd = [sys.executable, str(REPO / "tools" / "study.py"), "--scale=toy", f"--runs={runs}", f"--docs={docs}",
           f"--data={dataset}"]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("table.md", "table.json", "sweep.md", "ablations.md", "run.json", "README.md", "figure1.png", "curves.png"):
        assert (docs / name).is_file(), name
    table = json.loads((docs / "table.json").read_text())
    runs_seen = {r["run"] for r in table["rows"]}
    assert runs_seen == {"flm_tau", "flm_g_eq_t", "mdlm", "sdtt", "fmlm", "ar", "data"}
    assert all(r["seeds"] == 2 for r in table["rows"])
    # headline rows at their own step counts; the sweep holds every model at every count (one seed)
    assert {r["steps"] for r in table["rows"] if r["run"] == "fmlm"} == {1, 4}
    assert {r["steps"] for r in table["rows"] if r["run"] == "sdtt"} == {8}
    assert {r["steps"] for r in table["sweep"] if r["run"] == "mdlm"} == {1, 2}
    assert all(r["seeds"] == 1 for r in table["sweep"])
    assert {r["run"] for r in table["ablations"]} >= {"fmlm", "abl_s1w_none", "abl_nobound"}
    timings = json.loads((docs / "run.json").read_text())["stages"]
    assert "flm_tau" in timings and "eval_seed1" in timings
    # Re-running skips every finished stage.
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "[study]" not in again.stdout


def _row(run, steps, ppl, entropy, seeds=1, sec=1.0):
    return {"run": run, "method": run, "kind": "x", "steps": steps, "nfe": steps, "seeds": seeds, "gen_ppl": ppl,
            "gen_ppl_min": ppl, "gen_ppl_max": ppl, "entropy": entropy, "sec_per_sample": sec}


def test_claim_rules():
    rows = [_row("data", None, 100.0, 4.0), _row("flm_tau", 64, 150.0, 3.9), _row("mdlm", 64, 200.0, 3.9),
            _row("flm_g_eq_t", 64, 180.0, 3.9), _row("fmlm", 1, 160.0, 3.8, sec=0.1),
            _row("sdtt", 8, 400.0, 3.0, sec=0.8), _row("ar", 64, 120.0, 4.0)]
    verdicts = {c["claim"].replace(" (64 steps)", ""): c["verdict"] for c in claims(rows)}
    assert verdicts["FLM matches MDLM at many steps"] == "holds"
    assert verdicts["tau improves FLM at every step count"] == "holds"
    assert verdicts["FMLM in 1 step beats distilled discrete diffusion (SDTT) in 8"] == "holds"
    assert verdicts["FMLM in 1 step keeps entropy near the data's"] == "holds"
    assert verdicts["speed-up at equal quality over distilled discrete diffusion"] == "holds"
    rows[1] = _row("flm_tau", 64, 1000.0, 3.9)  # not learning: every verdict is "cannot tell"
    rows[6] = _row("ar", 64, 900.0, 4.0)
    rows[2] = _row("mdlm", 64, 800.0, 3.9)
    rows[3] = _row("flm_g_eq_t", 64, 950.0, 3.9)
    assert all(c["verdict"].startswith("cannot tell at this scale") for c in claims(rows))
    # a low Gen PPL from repetitive text (entropy far below the data's) is not "learning"
    rows[1] = _row("flm_tau", 64, 60.0, 1.8)
    found = claims(rows)
    assert all(c["verdict"].startswith("cannot tell at this scale") for c in found)
    assert "(mdlm, Gen PPL 800" in found[0]["verdict"]


def test_aggregate_spreads_over_seeds():
    def res(ppl):
        return {"rows": [{"kind": "flm", "checkpoint": "/r/flm_tau/checkpoints/step_1", "steps": 4, "nfe": 4,
                          "gen_ppl": ppl, "entropy": 3.0, "mauve": None, "distinct_2": 0.5, "sec_per_sample": 1.0}]}
    (row,) = aggregate([res(10.0), res(20.0), res(30.0)])
    assert row["run"] == "flm_tau" and row["gen_ppl"] == 20.0 and (row["gen_ppl_min"], row["gen_ppl_max"]) == (10, 30)
    assert row["mauve"] is None and row["seeds"] == 3
