"""The evaluation harness behind ``run/eval.py``: sample every model at several step
counts on every rank, score the samples (Gen PPL, entropy, MAUVE, distinct-n, speed)
and write the table.

    from flm.eval.harness import evaluate
    evaluate("runs/tiny/checkpoints/step_00000300,runs/fmlm/model.pt:fmlm_stage2", steps="1,2,4",
             num_samples=64, out="runs/eval/tiny")

Checkpoints are directories (EMA weights) or exported files of any kind that
``flm.sampling.load_sampler`` handles. ``PATH:KIND`` (or ``--expect_kind`` for
every path without one) asserts the kind: a method of ``flm.methods.METHODS``.
Methods with a fixed step count (AR: one network evaluation per token) get one
row at their own count instead of one per ``--steps`` entry. All
checkpoints must share one tokenizer (the sha256 of their datasets'
``tokenizer.model``) and one sequence length L.

Outputs in ``--out``: ``results.json`` (every number with its scorer and
embedder), ``results.md`` (the table), ``results.png`` (Gen PPL and MAUVE
against steps and wall time; :mod:`flm.eval.report`) and ``samples.jsonl``
(every scored sample's ids and text).

Rows: one per model and step count, plus the data's own row. 2N windows of L
tokens are spread evenly over ``--reference`` (a split of the checkpoints'
dataset, or of ``--data``, which must use the same tokenizer); the even ones are
the MAUVE reference of every row, the odd ones are the data row's samples, so
the data row's MAUVE compares two disjoint sets of held-out text.

Text: a sample is cut at EOS into documents, each decoded with our tokenizer.
Gen PPL scores every non-blank document as its own text (the scorer starts it
from its document-start token: EOS means a new document); MAUVE embeds each
sample whole, its documents joined by a blank line. Entropy and distinct-n use
the sampled token ids, EOS included.

Speed: ``sec_per_sample`` is device-seconds per sample: generation time summed
over ranks (after one warm-up call per model) divided by N, generating
``--batch_size`` samples per call; ``tokens_per_sec`` is L / sec_per_sample.

Distributed: each rank loads every model unsharded (evaluation models fit on
one device) and generates a share of the batches. Batch b draws its noise from
a generator seeded with (seed, b) and runs on rank b mod world, so the samples
do not depend on the number of ranks; every step count and model sees the same
noise. Rank 0 gathers the ids (gloo), scores them and writes the outputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from flm.config import ConfigError, parse_bool, parse_int_list
from flm.data import DataFormatError, TokenDataset, Tokenizer, check_tokenizer, tokenizer_path
from flm.eval import report
from flm.eval.entropy import distinct_n, mean_entropy
from flm.eval.generation import Model, generate_all, start_ranks
from flm.eval.genppl import PROTOCOLS
from flm.eval.reference import split_at_eos, spread_windows
from flm.loading import CheckpointError, read_config
from flm.methods import METHODS

log = logging.getLogger("flm")

SMOLLM2 = "smollm2"
DOCUMENT_SEPARATOR = "\n\n"  # between a sample's documents in the text MAUVE embeds


class EvalArgumentError(ValueError):
    """An argument of :func:`evaluate` that cannot be used; the message names it (``--name``)."""


# --------------------------------------------------------------------------- arguments


def parse_checkpoint(arg: str) -> tuple[Path, str | None, tuple[int, ...] | None]:
    """``PATH[:KIND][@N+M+...]`` -> (path, kind or None, own step counts or None).

    A path that exists as written wins. ``@1+4`` evaluates this checkpoint at 1 and 4
    steps instead of ``--steps`` (so one table can hold FMLM at 1 step and MDLM at 64)."""
    steps = None
    head, at, tail = arg.rpartition("@")
    if at and not Path(arg).exists():
        try:
            steps = tuple(int(n) for n in tail.split("+"))
        except ValueError:
            raise EvalArgumentError(f"--checkpoints: {arg!r}: expected step counts like @1+4 after '@'") from None
        if not steps or min(steps) < 1:
            raise EvalArgumentError(f"--checkpoints: {arg!r}: step counts must be >= 1")
        arg = head
    path, sep, kind = arg.rpartition(":")
    if not sep or "/" in kind or Path(arg).exists():
        return Path(arg), None, steps
    if kind not in METHODS:
        raise EvalArgumentError(f"--checkpoints: unknown kind {kind!r} in {arg!r}; expected one of {', '.join(METHODS)}")
    return Path(path), kind, steps


def short_label(path: Path) -> str:
    """``<run>/<step dir>`` for a checkpoint directory under ``<run>/checkpoints``, else the file name."""
    if path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}/{path.name}"
    return path.name


def resolve_models(checkpoints: Any, expect_kind: str | None) -> list[Model]:
    """Read every checkpoint's config and check its kind, before any model is loaded."""
    if expect_kind is not None and expect_kind not in METHODS:
        raise EvalArgumentError(f"--expect_kind={expect_kind!r}: expected one of {', '.join(METHODS)}")
    args = checkpoints.split(",") if isinstance(checkpoints, str) else list(checkpoints or [])
    parsed = [parse_checkpoint(str(arg).strip()) for arg in args if str(arg).strip()]
    if not parsed:
        raise EvalArgumentError("--checkpoints: give at least one checkpoint directory or exported file")
    models = []
    for path, kind, own_steps in parsed:
        try:
            config = read_config(path)
        except (CheckpointError, OSError, ValueError) as error:
            raise EvalArgumentError(f"--checkpoints: {path}: {error}") from None
        actual, expected = config.get("objective", "flm"), kind or expect_kind
        if expected is not None and actual != expected:
            raise EvalArgumentError(f"--checkpoints: {path} is a {actual!r} checkpoint, but {expected!r} was asked for "
                             f"({'PATH:KIND' if kind else '--expect_kind'})")
        models.append(Model(path, actual, config, short_label(path), own_steps))
    return _unique_labels(models)


def _unique_labels(models: list[Model]) -> list[Model]:
    """Short labels if they are distinct, else the full paths; the same path twice is an error."""
    if len({str(m.path.resolve()) for m in models}) < len(models):
        raise EvalArgumentError("--checkpoints: a checkpoint is given twice")
    if len({m.label for m in models}) == len(models):
        return models
    return [Model(m.path, m.kind, m.config, str(m.path), m.steps) for m in models]


def _dataset_tokenizer_file(dataset: Path, argument: str) -> Path:
    """The tokenizer file a dataset's manifest names (``tokenizer.model`` or ``tokenizer.json``)."""
    try:
        path = tokenizer_path(dataset)
    except (DataFormatError, OSError) as error:
        raise EvalArgumentError(f"{argument}: {dataset} is not a readable flm dataset directory ({error}); "
                                "moved dataset?") from None
    if not path.is_file():
        raise EvalArgumentError(f"{argument}: {dataset} has no {path.name} (moved dataset?)")
    return path


def shared_tokenizer(models: list[Model], data: str | None) -> tuple[Tokenizer, Path]:
    """The tokenizer all checkpoints share, and the dataset to read reference text from.

    Each checkpoint's tokenizer is the one of the dataset in its config
    (``data.path``); they must be byte-identical, and so must ``--data``'s, whose
    manifest must also record it. The models' vocabulary and sequence length must
    agree with it.
    """
    tokenizers = {}
    for model in models:
        path = _dataset_tokenizer_file(Path(model.config["data"]["path"]), f"--checkpoints: {model.path}")
        tokenizers[model.label] = Tokenizer.load(path)
    dataset = Path(data) if data is not None else Path(models[0].config["data"]["path"])
    data_tokenizer = _dataset_tokenizer_file(dataset, f"--data={data}")
    tokenizers[f"--data {dataset}"] = Tokenizer.load(data_tokenizer)
    if len({tok.sha256 for tok in tokenizers.values()}) > 1:
        listing = "; ".join(f"{name}: {tok.path} (sha256 {tok.sha256[:12]})" for name, tok in tokenizers.items())
        raise EvalArgumentError(f"--checkpoints/--data: tokenizer mismatch, all must share one tokenizer: {listing}")
    try:
        check_tokenizer(dataset, data_tokenizer)
    except DataFormatError as error:
        raise EvalArgumentError(f"{'--data' if data is not None else '--checkpoints'}: {error}") from None
    tokenizer = next(iter(tokenizers.values()))
    for model in models:
        vocab = int(model.config["model"]["vocab_size"])
        if vocab != tokenizer.vocab_size:
            raise EvalArgumentError(f"--checkpoints: {model.path} has a vocabulary of {vocab} but its tokenizer "
                             f"{tokenizer.path} has {tokenizer.vocab_size} pieces")
    if len({int(m.config["model"]["seq_len"]) for m in models}) > 1:
        raise EvalArgumentError("--checkpoints: the models have different seq_len; evaluate each length separately")
    return tokenizer, dataset


def load_scorer(name: str, device: torch.device) -> Any:
    """The Gen PPL scorer of a name accepted by :func:`check_arguments`; None for "none"."""
    if name == "none":
        return None
    from flm.eval.genppl import Scorer

    return Scorer.load(name.removeprefix("hf:"), device)


# --------------------------------------------------------------------------- scoring


def decode_documents(tokenizer: Tokenizer, sample: list[int]) -> list[str]:
    """The decoded documents of one sample, cut at EOS."""
    return [tokenizer.decode(doc) for doc in split_at_eos(sample, tokenizer.eos_id)]


class RowScorer:
    """Every metric of one set of token-id samples; generated and data rows go through the same code."""

    def __init__(self, tokenizer: Tokenizer, scorer: Any, reference: list[list[int]] | None, num_samples: int,
                 batch_size: int, seed: int, device: torch.device, protocol: str = "flm",
                 seq_len: int | None = None) -> None:
        """``reference``: the samples MAUVE compares against (None: no MAUVE); embedded once here."""
        self.tokenizer, self.scorer = tokenizer, scorer
        self.scorer_name = None if scorer is None else scorer.name
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.protocol, self.seq_len = protocol, seq_len
        self.reference_features = self.clusters = self.embedder = None
        if reference is not None:
            from flm.eval.mauve_score import EMBEDDER_NAME, choose_num_clusters, embed_texts

            texts = [DOCUMENT_SEPARATOR.join(decode_documents(tokenizer, sample)) for sample in reference]
            self.reference_features = embed_texts(texts, device=str(device))
            self.clusters = choose_num_clusters(len(texts), num_samples)
            self.embedder = EMBEDDER_NAME

    def __call__(self, name: str, samples: list[list[int]]) -> dict[str, Any]:
        """Metrics of ``samples``. If every sample decodes to blank text (a sampler that
        writes only EOS, e.g. a flow at one step) the row is kept with its entropy and
        distinct-n but no Gen PPL or MAUVE (there is no text to score), and a warning
        names it: a degenerate row is a result, not an error."""
        documents = [decode_documents(self.tokenizer, sample) for sample in samples]
        texts = [DOCUMENT_SEPARATOR.join(docs) for docs in documents]
        nonblank = [doc for docs in documents for doc in docs if doc.strip()]
        row: dict[str, Any] = {
            "num_samples": len(samples),
            "empty_samples": sum(not text.strip() for text in texts),
            "entropy": mean_entropy(samples),
            **{f"distinct_{n}": distinct_n(samples, n) for n in (1, 2, 3)},
            "gen_ppl": None, "gen_nll": None, "gen_ppl_documents": None, "gen_ppl_tokens": None,
            "scorer": self.scorer_name,
            "mauve": None, "mauve_clusters": self.clusters, "embedder": self.embedder,
        }
        if not nonblank:
            log.warning("%s: all %d samples are empty after decoding (only EOS and whitespace): "
                        "no Gen PPL or MAUVE for this row", name, len(samples))
            return row
        if self.scorer is not None:
            if self.protocol == "paper":  # whole samples, special tokens kept, batches of 8, cut at L scorer tokens
                ppl = self.scorer.gen_ppl([self.tokenizer.decode_with_special_tokens(sample) for sample in samples],
                                          batch_size=8, max_length=self.seq_len, progress=False,
                                          protocol="paper")
            else:
                ppl = self.scorer.gen_ppl(nonblank, batch_size=self.batch_size, progress=False)
            row.update(gen_ppl=ppl["ppl"], gen_nll=ppl["nll"], gen_ppl_documents=ppl["samples"],
                       gen_ppl_tokens=ppl["tokens"])
        if self.reference_features is not None:
            from flm.eval.mauve_score import embed_texts, mauve_from_features

            features = embed_texts(texts, device=str(self.device))
            row["mauve"] = mauve_from_features(self.reference_features, features, self.clusters, self.seed)["mauve"]
        return row


def reference_windows(dataset: Path, split: str, seq_len: int, num: int, mauve: bool) -> list[list[int]]:
    """2 * num held-out windows of ``seq_len`` tokens (fewer if the split is short), spread over the split."""
    try:
        windows = spread_windows(TokenDataset(dataset, split), seq_len, 2 * num)
    except DataFormatError as error:
        raise EvalArgumentError(f"--reference={split}: {error}") from None
    needed = 4 if mauve else 2  # two disjoint sets; MAUVE needs two texts in each
    if len(windows) < needed:
        raise EvalArgumentError(f"--reference={split}: the split of {dataset} holds {len(windows)} windows of {seq_len} "
                         f"tokens; need {needed}{' for MAUVE (or pass --mauve false)' if mauve else ''}")
    return windows


def score_rows(sets: list[dict[str, Any]], row_scorer: RowScorer, hide_bars: bool | None) -> list[dict[str, Any]]:
    """Each sample set's row: its information (steps, NFE, speed, ...) and its metrics."""
    rows = []
    for s in tqdm(sets, desc="scoring", unit="row", disable=hide_bars):
        name = s["model"] if s["steps"] is None else f"{s['model']} at {s['steps']} steps"
        rows.append({**{k: v for k, v in s.items() if k != "ids"}, **row_scorer(name, s["ids"])})
    return rows


def write_samples(sets: list[dict[str, Any]], tokenizer: Tokenizer, path: Path) -> None:
    """One JSON line per sample: model, kind, steps, index, ids and text (EOS shown as <eos>)."""
    with open(path, "w") as f:
        for s in sets:
            for index, ids in enumerate(s["ids"]):
                f.write(json.dumps({"model": s["model"], "kind": s["kind"], "steps": s["steps"], "index": index,
                                    "ids": ids, "text": tokenizer.decode(ids)}) + "\n")


# --------------------------------------------------------------------------- main


def check_arguments(steps: Any, num_samples: int, batch_size: int, scorer: str, mauve: bool,
                    protocol: str = "flm") -> list[int]:
    """Validate the plain arguments (before anything is loaded); return the step counts."""
    if protocol not in PROTOCOLS:
        raise EvalArgumentError(f"--protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    try:
        step_list = parse_int_list("steps", steps)
    except ConfigError as error:
        raise EvalArgumentError(str(error)) from None
    if not step_list or min(step_list) < 1:
        raise EvalArgumentError(f"--steps={steps!r}: step counts must be >= 1")
    if num_samples < (2 if mauve else 1):
        raise EvalArgumentError(f"--num_samples={num_samples}: need at least "
                         f"{'2 samples for MAUVE (or pass --mauve false)' if mauve else '1 sample'}")
    if batch_size < 1:
        raise EvalArgumentError(f"--batch_size={batch_size}: must be >= 1")
    if scorer not in (SMOLLM2, "none") and not scorer.startswith("hf:") and not Path(scorer).is_dir():
        raise EvalArgumentError(f"--scorer={scorer!r}: unknown scorer; expected smollm2, none, a local model directory "
                         "or hf:<hub id>")
    return step_list


def evaluate(checkpoints: str | tuple, steps: str | int | tuple = "1,2,4,8,64", num_samples: int = 64,
         reference: str = "validation", out: str = "runs/eval", scorer: str = SMOLLM2, batch_size: int = 16,
         seed: int = 0, mauve: bool | str = True, expect_kind: str | None = None, data: str | None = None,
         teacher: str | None = None, device: str = "auto", progress: bool | str = "auto",
         protocol: str = "flm", prompt_tokens: int = 0) -> None:
    """Evaluate ``checkpoints`` (comma-separated ``PATH[:KIND][@N+M]``) at every count in ``steps``
    (or at a checkpoint's own ``@`` counts).

    ``num_samples`` samples per model and step count, generated ``batch_size`` at
    a time (also the Gen PPL batch size); MAUVE and the data row use the split
    ``reference`` of the checkpoints' dataset, or of ``data``. ``scorer``: smollm2,
    none, a local model directory or hf:<hub id>. ``teacher`` overrides the FLM
    teacher recorded in stage-1 maps. ``progress``: auto (bars only on a terminal), true or false. ``device``: auto (cuda:LOCAL_RANK if
    available, else cpu) or a torch device. ``protocol``: how Gen PPL is computed
    (:mod:`flm.eval.genppl`): "flm" (ours, the default: each document of a sample
    scored from the scorer's document-start token) or "paper" (the authors'
    metrics.py: whole samples decoded with special tokens, retokenised, cut at L
    scorer tokens, first token unscored, batches of 8, token-weighted mean).

    ``prompt_tokens`` = K > 0 evaluates completions instead: sample i holds the
    first K tokens of held-out window i (of the odd windows) fixed and generates
    the rest; every metric scores the L - K generated tokens only, MAUVE against
    the true continuations of those same prompts, and the data row holds the
    continuations of other held-out windows (the even ones).
    """
    num, batch_size = int(num_samples), int(batch_size)
    try:
        use_mauve = parse_bool("mauve", mauve)
        # tqdm's ``disable``: None hides the bars when stderr is not a terminal (logs, CI)
        hide_bars = None if progress == "auto" else not parse_bool("progress", progress)
    except ConfigError as error:
        raise EvalArgumentError(str(error)) from None
    step_list = check_arguments(steps, num, batch_size, scorer, use_mauve, protocol)
    models = resolve_models(checkpoints, expect_kind)
    tokenizer, dataset = shared_tokenizer(models, data)
    seq_len = int(models[0].config["model"]["seq_len"])
    windows = reference_windows(dataset, reference, seq_len, num, use_mauve)
    prompt_tokens = int(prompt_tokens)
    prompts = None
    if prompt_tokens:
        if not 0 < prompt_tokens < seq_len:
            raise EvalArgumentError(f"--prompt_tokens={prompt_tokens}: expected 1 to {seq_len - 1} (L = {seq_len})")
        prompts = windows[1::2]
        if len(prompts) < num:
            raise EvalArgumentError(f"--prompt_tokens: the split {reference!r} holds {len(prompts)} prompts for "
                                    f"--num_samples={num}; lower --num_samples")
        # the rows score continuations; MAUVE compares with the prompts' own continuations
        windows = [w[prompt_tokens:] for pair in zip(windows[1::2], windows[0::2]) for w in pair]

    ranks = start_ranks(device)
    try:
        if ranks.is_main:  # load the scorer and embed the reference before the (long) generation
            row_scorer = RowScorer(tokenizer, load_scorer(scorer, ranks.device),
                                   windows[0::2] if use_mauve else None, num, batch_size, seed, ranks.device,
                                   protocol, seq_len)
        sets = generate_all(models, step_list, num, batch_size, seed, teacher, ranks, hide_bars, prompts,
                            prompt_tokens)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not ranks.is_main:
        return

    sets.append({"model": f"data ({reference})", "checkpoint": str(dataset), "kind": report.DATA_KIND,
                 "steps": None, "nfe": None, "sec_per_sample": None, "tokens_per_sec": None,
                 "ids": windows[1::2]})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_samples(sets, tokenizer, out_dir / "samples.jsonl")
    results = {
        "scorer": row_scorer.scorer_name,
        "gen_ppl_protocol": protocol,
        "embedder": row_scorer.embedder,
        "mauve_clusters": row_scorer.clusters,
        "reference": {"dataset": str(dataset), "split": reference, "tokenizer_sha256": tokenizer.sha256,
                      "mauve_windows": len(windows[0::2]) if use_mauve else 0, "row_windows": len(windows[1::2])},
        "seq_len": seq_len, "prompt_tokens": prompt_tokens,
        "num_samples": num, "steps": step_list, "seed": seed, "batch_size": batch_size,
        "world_size": ranks.world, "device": str(ranks.device),
        "decoding": "samples cut at EOS; Gen PPL scores each non-blank document separately, MAUVE embeds "
                    "each sample with its documents joined by a blank line; entropy and distinct-n on token ids",
        "rows": score_rows(sets, row_scorer, hide_bars),
    }
    paths = report.write(results, out_dir)
    print(report.markdown(results))
    print("wrote", ", ".join(str(p) for p in [*paths.values(), out_dir / "samples.jsonl"]))

