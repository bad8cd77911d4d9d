"""Text inputs: finding input files, reading documents, cleaning and splitting them.

Inputs are any mix of files, directories (searched recursively, in sorted order)
and glob patterns. A ``.txt`` file is one document; every line of a ``.jsonl``,
``.jsonl.gz`` or ``.jsonl.zst`` file is one JSON object whose ``text_field`` is
one document.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import zstandard

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SPACE_RUNS = re.compile(r"[^\S\n]+")
_BLANK_RUNS = re.compile(r"\n{3,}")


def _is_text_input(path: Path) -> bool:
    return path.name.endswith(TEXT_SUFFIXES)


def resolve_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """Expand files, directories and globs into a list of input files (order of ``inputs`` kept)."""
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    files: list[Path] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and _is_text_input(p))
        elif path.is_file():
            if not _is_text_input(path):
                raise ValueError(f"{path}: unsupported input type; expected one of {', '.join(TEXT_SUFFIXES)}")
            files.append(path)
        else:
            files.extend(Path(p) for p in sorted(glob.glob(str(entry), recursive=True))
                         if Path(p).is_file() and _is_text_input(Path(p)))
    return files


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".zst"):
        return io.TextIOWrapper(zstandard.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(files: Sequence[Path], text_field: str = "text") -> Iterator[str]:
    """Yield the documents of ``files`` in order; raise ValueError naming the file on bad input."""
    for path in files:
        try:
            with _open_text(path) as f:
                if path.name.endswith(".txt"):
                    yield f.read()
                    continue
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise ValueError(f"{path}:{line_no}: expected a JSON object with a string "
                                         f"field {text_field!r} (set --text_field)")
                    yield record[text_field]
        except (UnicodeDecodeError, json.JSONDecodeError, OSError, zstandard.ZstdError) as e:
            raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and footer if the text has the standard markers."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def normalize_text(text: str) -> str:
    """Unify newlines, collapse runs of spaces/tabs, strip lines, keep single blank lines between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACE_RUNS.sub(" ", line).strip() for line in text.split("\n")]
    text = _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()
    return text + "\n" if text else ""


def is_validation(index: int, fraction: float) -> bool:
    """Deterministic document split: every k-th document (k = round(1/fraction)), from the first."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"validation fraction must be in (0, 0.5], got {fraction}")
    return index % max(1, round(1 / fraction)) == 0
