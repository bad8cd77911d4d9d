"""On-disk token format: round trip, determinism, atomicity and every integrity error."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import DATA_TINY_VOCAB, packed_stream, random_documents

from flm.data import DataFormatError, TokenDataset, check_compatible, check_tokenizer, tokenizer_path, write_dataset
from flm.data.shards import sha256_file


def _write(out: Path, tokenizer: Path, documents, **kwargs) -> dict:
    return write_dataset(out, {"train": documents}, tokenizer, DATA_TINY_VOCAB, 2,
                         frame_tokens=16, shard_tokens=64, **kwargs)


def _edit_manifest(dataset: Path, edit) -> None:
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_round_trip_across_frames_and_shards(make_tiny_dataset):
    dataset = make_tiny_dataset(frame_tokens=16, shard_tokens=64)
    expected = packed_stream(random_documents(0, 60))
    tokens = TokenDataset(dataset, "train")
    assert tokens.num_tokens == expected.size and tokens.num_documents == 60
    assert tokens.dtype == np.uint16 and tokens.vocab_size == DATA_TINY_VOCAB and tokens.eos_id == 2
    shards = tokens.manifest["splits"]["train"]["shards"]
    assert len(shards) == -(-expected.size // 64) and all(s["num_tokens"] == 64 for s in shards[:-1])
    np.testing.assert_array_equal(tokens.read(0, tokens.num_tokens), expected)
    rng = np.random.default_rng(1)
    for start in rng.integers(0, expected.size - 200, 100):
        length = int(rng.integers(0, 200))  # spans up to 13 frames and 4 shards
        np.testing.assert_array_equal(tokens.read(int(start), length), expected[start:start + length])
    assert tokens.read(10, 5, np.int64).dtype == np.int64
    with pytest.raises(IndexError):
        tokens.read(expected.size - 3, 4)
    tokens.verify()
    validation = TokenDataset(dataset, "validation")
    np.testing.assert_array_equal(validation.read(0, validation.num_tokens), packed_stream(random_documents(1, 8)))


def test_pickled_dataset_reopens_shards(make_tiny_dataset):
    tokens = TokenDataset(make_tiny_dataset(), "train")
    tokens.read(0, 100)
    clone = pickle.loads(pickle.dumps(tokens))
    assert not clone._cache
    np.testing.assert_array_equal(clone.read(0, tokens.num_tokens), tokens.read(0, tokens.num_tokens))


def test_writes_are_byte_identical(tmp_path, tiny_tokenizer):
    documents = random_documents(3, 40)
    _write(tmp_path / "a", tiny_tokenizer, documents)
    _write(tmp_path / "b", tiny_tokenizer, documents)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert "manifest.json" in files and "tokenizer.model" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_failed_write_leaves_nothing(tmp_path, tiny_tokenizer):
    def documents():
        yield from random_documents(0, 30)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        _write(tmp_path / "out", tiny_tokenizer, documents())
    assert list(tmp_path.iterdir()) == []  # neither out nor out.tmp-<pid>


def test_existing_dataset_needs_overwrite(tmp_path, tiny_tokenizer):
    _write(tmp_path / "out", tiny_tokenizer, random_documents(0, 5))
    with pytest.raises(FileExistsError, match="overwrite"):
        _write(tmp_path / "out", tiny_tokenizer, random_documents(1, 5))
    _write(tmp_path / "out", tiny_tokenizer, random_documents(1, 5), overwrite=True)
    assert TokenDataset(tmp_path / "out").num_documents == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_token_id_out_of_vocab_rejected_at_write(tmp_path, tiny_tokenizer):
    documents = random_documents(0, 5)
    documents[3][7] = DATA_TINY_VOCAB
    message = r"split 'train' document 3: token id 400 is outside \[0, vocab_size=400\)"
    with pytest.raises(DataFormatError, match=message):
        _write(tmp_path / "out", tiny_tokenizer, documents)
    assert not (tmp_path / "out").exists()


def test_missing_manifest(make_tiny_dataset):
    dataset = make_tiny_dataset()
    (dataset / "manifest.json").unlink()
    with pytest.raises(DataFormatError, match=r"manifest\.json: manifest not found"):
        TokenDataset(dataset, "train")


def test_unknown_format_version(make_tiny_dataset):
    dataset = make_tiny_dataset()
    _edit_manifest(dataset, lambda m: m.update(format_version=3))
    with pytest.raises(DataFormatError, match="manifest.json: unsupported format_version 3; expected 1 or 2"):
        TokenDataset(dataset, "train")
    _edit_manifest(dataset, lambda m: m.pop("format_version"))
    with pytest.raises(DataFormatError, match=r"missing field 'format_version' \(expected int\)"):
        TokenDataset(dataset, "train")


def test_missing_or_wrong_fields(make_tiny_dataset):
    dataset = make_tiny_dataset()
    _edit_manifest(dataset, lambda m: m["splits"]["train"]["shards"][1].pop("sha256"))
    with pytest.raises(DataFormatError, match=r"missing field 'splits\.train\.shards\[1\]\.sha256' \(expected str\)"):
        TokenDataset(dataset, "train")
    _edit_manifest(dataset, lambda m: m.update(vocab_size="400"))
    with pytest.raises(DataFormatError, match=r"field 'vocab_size' is '400', expected int"):
        TokenDataset(dataset, "train")
    with pytest.raises(DataFormatError, match=r"no split 'test'"):
        TokenDataset(make_tiny_dataset("other"), "test")


def test_checksum_mismatch_found_by_verify(make_tiny_dataset):
    dataset = make_tiny_dataset()
    shard = dataset / "train-00001.flm"
    data = bytearray(shard.read_bytes())
    data[20] ^= 0xFF  # inside frame 0; size, footer and index stay valid
    shard.write_bytes(bytes(data))
    tokens = TokenDataset(dataset, "train")  # cheap checks pass
    with pytest.raises(DataFormatError, match=r"train-00001\.flm: sha256 \w+ does not match the manifest"):
        tokens.verify()


def test_truncated_shard_fails_at_open(make_tiny_dataset):
    dataset = make_tiny_dataset()
    shard = dataset / "train-00002.flm"
    os.truncate(shard, shard.stat().st_size - 10)
    with pytest.raises(DataFormatError, match=r"train-00002\.flm: file is \d+ bytes but the manifest records"):
        TokenDataset(dataset, "train")


def test_corrupt_frame_fails_at_read(make_tiny_dataset):
    dataset = make_tiny_dataset()
    shard = dataset / "train-00000.flm"
    manifest = json.loads((dataset / "manifest.json").read_text())
    num_frames = manifest["splits"]["train"]["shards"][0]["num_frames"]
    data = bytearray(shard.read_bytes())
    index_start = len(data) - 32 - 8 * (num_frames + 1)
    offsets = np.frombuffer(bytes(data[index_start:-32]), "<u8")
    middle = int(offsets[1] + offsets[2]) // 2
    data[middle] ^= 0x55  # corrupt the payload of frame 1 only
    shard.write_bytes(bytes(data))
    tokens = TokenDataset(dataset, "train")
    tokens.read(0, 16)  # frame 0 is fine
    with pytest.raises(DataFormatError, match=r"train-00000\.flm: frame 1: corrupt zstd frame"):
        tokens.read(16, 16)


def test_out_of_vocab_id_in_hand_made_shard_found_by_verify(make_tiny_dataset):
    """Rebuild a shard by hand, following the documented layout, with one id >= vocab_size."""
    dataset = make_tiny_dataset()
    tokens = TokenDataset(dataset, "train")
    original = tokens.read(0, 256).copy()  # shard 0: 256 tokens in 16 frames of 16
    original[37] = DATA_TINY_VOCAB + 5
    compressor = zstandard.ZstdCompressor(write_checksum=True)
    frames = [compressor.compress(original[i:i + 16].astype("<u2").tobytes()) for i in range(0, 256, 16)]
    offsets = np.cumsum([0] + [len(f) for f in frames]).astype("<u8")
    data = b"".join(frames) + offsets.tobytes() + struct.pack("<8sQQII", b"FLMTOKS1", 256, 16, 16, 2)
    shard = dataset / "train-00000.flm"
    shard.write_bytes(data)
    _edit_manifest(dataset, lambda m: m["splits"]["train"]["shards"][0].update(
        bytes=len(data), sha256=sha256_file(shard)))
    tokens = TokenDataset(dataset, "train")
    np.testing.assert_array_equal(tokens.read(0, 256), original)
    with pytest.raises(DataFormatError, match=r"train-00000\.flm: frame 2: token id 405 at shard position 37 "
                                              r"is >= vocab_size 400"):
        tokens.verify()


def test_tokenizer_must_match_recorded(make_tiny_dataset, tiny_tokenizer, tmp_path):
    dataset = make_tiny_dataset()
    check_tokenizer(dataset, tiny_tokenizer)
    other = tmp_path / "other.model"
    other.write_bytes(tiny_tokenizer.read_bytes() + b"\0")
    with pytest.raises(DataFormatError, match=r"tokenizer .*other\.model .* differs from the one recorded"):
        check_tokenizer(dataset, other)


def test_config_must_fit_dataset(make_tiny_dataset):
    tokens = TokenDataset(make_tiny_dataset(), "validation")
    check_compatible(tokens, DATA_TINY_VOCAB, 64)
    with pytest.raises(DataFormatError, match=r"model\.vocab_size=512 disagrees with the dataset .*vocab_size=400"):
        check_compatible(tokens, 512, 64)
    with pytest.raises(DataFormatError, match=rf"data\.seq_len={tokens.num_tokens + 1} must be in "
                                              rf"\[1, {tokens.num_tokens}\].*split 'validation'"):
        check_compatible(tokens, None, tokens.num_tokens + 1)


def test_bos_eos_framing_and_recorded_special_ids(tmp_path, tiny_tokenizer):
    documents = random_documents(4, 20)
    manifest = _write(tmp_path / "out", tiny_tokenizer, documents, bos_id=1, pad_id=0, framing="bos_eos")
    assert (manifest["bos_id"], manifest["pad_id"], manifest["framing"]) == (1, 0, "bos_eos")
    tokens = TokenDataset(tmp_path / "out", "train")
    assert (tokens.bos_id, tokens.pad_id, tokens.framing, tokens.tokenizer_kind) == (1, 0, "bos_eos", "sentencepiece")
    expected = np.concatenate([np.concatenate([[1], doc, [2]]) for doc in documents])
    np.testing.assert_array_equal(tokens.read(0, tokens.num_tokens), expected)
    with pytest.raises(ValueError, match=r"framing 'sentences' puts a BOS before every sequence, but bos_id is None"):
        _write(tmp_path / "x", tiny_tokenizer, documents, framing="sentences")
    with pytest.raises(ValueError, match=r"pad_id 400 is outside \[0, vocab_size=400\)"):
        _write(tmp_path / "x", tiny_tokenizer, documents, pad_id=400)
    with pytest.raises(ValueError, match=r"tokenizer_kind 'bpe' is not one of sentencepiece, huggingface, gpt2"):
        _write(tmp_path / "x", tiny_tokenizer, documents, tokenizer_kind="bpe")


def test_tokenizer_json_kinds_are_stored_as_tokenizer_json(tmp_path, bert_like_tokenizer):
    write_dataset(tmp_path / "out", {"train": [np.array([5, 6])]}, bert_like_tokenizer, 12, 3, bos_id=2,
                  framing="sentences", tokenizer_kind="huggingface")
    assert tokenizer_path(tmp_path / "out") == tmp_path / "out" / "tokenizer.json"
    assert TokenDataset(tmp_path / "out").read(0, 4).tolist() == [2, 5, 6, 3]
    check_tokenizer(tmp_path / "out", bert_like_tokenizer)


def test_manifest_without_the_newer_fields_reads_as_before(make_tiny_dataset):
    dataset = make_tiny_dataset()

    def drop(manifest):
        for key in ("bos_id", "pad_id", "framing"):
            manifest.pop(key)
        manifest["tokenizer"].pop("kind")

    _edit_manifest(dataset, drop)
    tokens = TokenDataset(dataset, "train")
    assert (tokens.bos_id, tokens.pad_id, tokens.framing, tokens.tokenizer_kind) == (None, None, "eos", "sentencepiece")
    assert tokenizer_path(dataset) == dataset / "tokenizer.model"
    tokens.verify()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(framing="lines"), r"field 'framing' is 'lines', expected one of 'eos', 'bos_eos', "
                                          r"'sentences'"),
    (lambda m: m.update(framing="bos_eos"), r"field 'framing' is 'bos_eos' but 'bos_id' is null"),
    (lambda m: m.update(bos_id=400), r"field 'bos_id' is 400, expected null or an id in \[0, vocab_size=400\)"),
    (lambda m: m.update(pad_id="0"), r"field 'pad_id' is '0', expected null or an id"),
    (lambda m: m["tokenizer"].update(kind="bpe"), r"field 'tokenizer\.kind' is 'bpe', expected one of"),
    (lambda m: m["tokenizer"].update(file="../tokenizer.model"), r"field 'tokenizer\.file' must be a plain file name"),
])
def test_bad_framing_and_tokenizer_fields(make_tiny_dataset, edit, message):
    dataset = make_tiny_dataset()
    _edit_manifest(dataset, edit)
    with pytest.raises(DataFormatError, match=message):
        TokenDataset(dataset, "train")


# ------------------------------------------------------------------ format_version 2: zstd dictionary


def test_frames_use_a_dictionary_trained_on_the_first_frames(make_tiny_dataset):
    dataset = make_tiny_dataset(frame_tokens=16, shard_tokens=64)
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    info = manifest["compression"]["dictionary"]
    data = (dataset / "zstd.dict").read_bytes()
    assert info == {"file": "zstd.dict", "bytes": len(data), "sha256": sha256_file(dataset / "zstd.dict")}
    dict_id = zstandard.ZstdCompressionDict(data).dict_id()
    shard = (dataset / "train-00000.flm").read_bytes()
    assert zstandard.get_frame_parameters(shard).dict_id == dict_id  # frame 0 needs the dictionary
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(shard)
    tokens = TokenDataset(dataset, "train")
    np.testing.assert_array_equal(tokens.read(0, tokens.num_tokens), packed_stream(random_documents(0, 60)))
    tokens.verify()


def test_format_version_1_without_dictionary_still_reads(tmp_path, tiny_tokenizer):
    """dict_bytes=0 writes the frames version 1 wrote; with a version-1 manifest they read as before."""
    documents = random_documents(4, 30)
    _write(tmp_path / "v1", tiny_tokenizer, documents, dict_bytes=0)
    assert not (tmp_path / "v1" / "zstd.dict").exists()

    def to_version_1(m):
        m.update(format_version=1, compression={"codec": "zstd", "level": 3})

    _edit_manifest(tmp_path / "v1", to_version_1)
    tokens = TokenDataset(tmp_path / "v1", "train")
    np.testing.assert_array_equal(tokens.read(0, tokens.num_tokens), packed_stream(documents))
    tokens.verify()


def test_too_little_data_for_a_dictionary_writes_none(tmp_path, tiny_tokenizer):
    manifest = _write(tmp_path / "small", tiny_tokenizer, random_documents(5, 1))
    assert manifest["compression"]["dictionary"] is None and not (tmp_path / "small" / "zstd.dict").exists()
    tokens = TokenDataset(tmp_path / "small", "train")
    np.testing.assert_array_equal(tokens.read(0, tokens.num_tokens), packed_stream(random_documents(5, 1)))


def test_dictionary_checksum_failure_is_named(make_tiny_dataset):
    dataset = make_tiny_dataset()
    path = dataset / "zstd.dict"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match=r"zstd\.dict: zstd dictionary of \d+ bytes, sha256 \w+, does not "
                                              r"match the manifest's"):
        TokenDataset(dataset, "train")
    path.unlink()
    with pytest.raises(DataFormatError, match=r"zstd\.dict: zstd dictionary listed in the manifest is missing"):
        TokenDataset(dataset, "train")


def test_frames_read_with_another_dictionary_fail_by_frame(make_tiny_dataset):
    """Another (valid, checksummed) dictionary in place of the right one: reads fail naming the frame."""
    dataset = make_tiny_dataset()
    other = make_tiny_dataset("other", seed=7)
    (dataset / "zstd.dict").write_bytes((other / "zstd.dict").read_bytes())
    _edit_manifest(dataset, lambda m: m["compression"].update(
        dictionary=json.loads((other / "manifest.json").read_text())["compression"]["dictionary"]))
    tokens = TokenDataset(dataset, "train")
    with pytest.raises(DataFormatError, match=r"train-00000\.flm: frame 0: corrupt zstd frame, or not of this "
                                              r"dataset's dictionary"):
        tokens.read(0, 16)


def test_bad_compression_fields(make_tiny_dataset):
    dataset = make_tiny_dataset()
    _edit_manifest(dataset, lambda m: m["compression"]["dictionary"].update(file="../zstd.dict"))
    with pytest.raises(DataFormatError, match=r"'compression\.dictionary\.file' must be a plain file name"):
        TokenDataset(dataset, "train")
    _edit_manifest(dataset, lambda m: m["compression"].update(codec="lz4"))
    with pytest.raises(DataFormatError, match=r"field 'compression\.codec' is 'lz4', expected 'zstd'"):
        TokenDataset(dataset, "train")
