"""The .flm container: fastllm-written layouts, round trips, and hostile bytes."""

import os
import stat
import struct

import numpy as np
import pytest
import torch

from fastllm_layout import flm_file, s_int, s_str, tensor_record
from flm.errors import FlmError, FlmFormatError
from flm.format.flm import FlmWriter, VocabEntry, read_flm, rewrite_flm
from flm.quant import DType, dequantize


def _weights():
    rng = np.random.default_rng(1)
    return {"a.weight": rng.normal(size=(8, 64)).astype(np.float32), "norm.weight": rng.normal(size=(64,)).astype(np.float32)}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4", "int4g"])
def test_reads_fastllm_layout(tmp_path, dtype):
    w = _weights()
    blob = flm_file({"model_type": "llama", "tokenizer_use_score": "1"}, [(b"\xe2\x96\x81a", 0, -1.5), (b"b", 1, 0.0)],
                    [tensor_record("a.weight", w["a.weight"], dtype, 32), tensor_record("norm.weight", w["norm.weight"], "float32")])
    path = tmp_path / "f.flm"
    path.write_bytes(blob)
    flm = read_flm(path)
    assert flm.version == 2 and flm.kv["model_type"] == "llama"
    assert [(e.piece, e.token_id, e.score) for e in flm.vocab] == [("\u2581a".encode(), 0, -1.5), (b"b", 1, 0.0)]
    rec = flm.tensors["a.weight"]
    assert rec.dims == (8, 64)
    if rec.quantized:
        back = dequantize(flm.quantized(rec), rec.dims).numpy()
        assert np.abs(back - w["a.weight"]).max() < 0.6  # within a quantization step of N(0,1) data
    else:
        np.testing.assert_array_equal(flm.float_tensor(rec).float().numpy(), w["a.weight"].astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(flm.float_tensor(flm.tensors["norm.weight"]).numpy(), w["norm.weight"])


@pytest.mark.parametrize("version", [0, 1])
def test_reads_old_versions(tmp_path, version):
    w = _weights()
    blob = flm_file({"model_type": "llama"}, [(b"x", 0, 0.0), (b"y", 1, 0.0)],
                    [tensor_record("norm.weight", w["norm.weight"], "float32")], version=version)
    (tmp_path / "old.flm").write_bytes(blob)
    flm = read_flm(tmp_path / "old.flm")
    assert flm.version == version
    assert [e.score for e in flm.vocab] == [0.0, -1.0]  # no scores stored: fastllm ranks by position
    assert flm.tensors["norm.weight"].dims == (64,)


def test_reads_padded_int4g_rows(tmp_path):
    """fastllm pads a row that the group size does not divide; the reader must follow."""
    w = np.random.default_rng(2).normal(size=(4, 48)).astype(np.float32)
    (tmp_path / "p.flm").write_bytes(flm_file({}, [], [tensor_record("w", w, "int4g", 32)]))
    flm = read_flm(tmp_path / "p.flm")
    rec = flm.tensors["w"]
    assert (rec.group, rec.group_cnt) == (2, 32)
    assert np.abs(dequantize(flm.quantized(rec), rec.dims).numpy() - w).max() < 0.5


def _write_sample(path, special=("<s>",)):
    with FlmWriter(path) as writer:
        writer.write_header({"model_type": "llama", "b": "2", "a": "é"}, [VocabEntry(b"<s>", 0, 1.0), VocabEntry(b"\xe4\xbd\xa0", 1, -3.0)],
                            list(special))
        writer.begin_tensors(4)
        torch.manual_seed(0)
        w = torch.randn(16, 64)
        writer.write_tensor("w8", w, DType.INT8)
        writer.write_tensor("w4", w, DType.INT4_NOZERO)
        writer.write_tensor("w4g", w, DType.INT4_GROUP, 32)
        writer.write_tensor("bf", w, DType.BFLOAT16)


def test_round_trip_is_byte_identical(tmp_path):
    _write_sample(tmp_path / "a.flm")
    first = read_flm(tmp_path / "a.flm")
    rewrite_flm(first, tmp_path / "b.flm")
    second = read_flm(tmp_path / "b.flm")
    rewrite_flm(second, tmp_path / "c.flm")
    assert (tmp_path / "b.flm").read_bytes() == (tmp_path / "c.flm").read_bytes()
    assert (tmp_path / "a.flm").read_bytes() == (tmp_path / "b.flm").read_bytes()
    assert first.special_tokens == ["<s>"]


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "m.flm"
    _write_sample(target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        with FlmWriter(target) as writer:
            writer.write_header({}, [], [])
            writer.begin_tensors(2)
            writer.write_tensor("x", torch.ones(4), DType.FLOAT32)
            raise RuntimeError("boom")
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.flm"]  # no partial file left


def test_written_file_has_the_umask_mode(tmp_path):
    """The temporary file is private while written; the finished one is readable like any other."""
    old = os.umask(0o022)
    try:
        _write_sample(tmp_path / "m.flm")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.flm").stat().st_mode) == 0o644


def test_writer_refuses_missing_tensors(tmp_path):
    with pytest.raises(FlmError, match="missing"):
        with FlmWriter(tmp_path / "short.flm") as writer:
            writer.write_header({}, [], [])
            writer.begin_tensors(2)
            writer.write_tensor("x", torch.ones(4), DType.FLOAT32)
    assert not (tmp_path / "short.flm").exists()


def test_every_truncation_is_a_format_error(tmp_path):
    _write_sample(tmp_path / "a.flm")
    blob = (tmp_path / "a.flm").read_bytes()
    step = max(1, len(blob) // 300)
    for cut in list(range(0, len(blob), step)) + [len(blob) - 1]:
        (tmp_path / "t.flm").write_bytes(blob[:cut])
        with pytest.raises(FlmFormatError) as err:
            read_flm(tmp_path / "t.flm")
        assert "t.flm" in str(err.value)


@pytest.mark.parametrize("blob,problem", [
    (s_int(7), "unknown .flm version"),
    (s_int(2) + s_int(2_000_000_000), "key/value count"),
    (s_int(2) + s_int(1) + s_int(-5), "needs -5 bytes"),
    (s_int(2) + s_int(0) + s_int(0) + s_int(1) + s_str("w") + s_int(1) + s_int(4) + s_int(42), "unknown data type code 42"),
    (s_int(2) + s_int(0) + s_int(0) + s_int(1) + s_str("w") + s_int(2) + s_int(-1) + s_int(4), "negative dimension"),
    (s_int(2) + s_int(0) + s_int(0) + s_int(1) + s_str("w") + s_int(99), "dimensions"),
    (s_int(2) + s_int(0) + s_int(0) + s_int(1) + s_str("w") + s_int(2) + s_int(1 << 30) + s_int(1 << 30) + s_int(0), "cannot fit"),
    (s_int(2) + s_int(0) + s_int(1) + s_int(1) + s_int(999) + s_int(0), "byte value"),
])
def test_corrupt_headers(tmp_path, blob, problem):
    (tmp_path / "bad.flm").write_bytes(blob + b"\0" * 16)
    with pytest.raises(FlmFormatError, match=problem):
        read_flm(tmp_path / "bad.flm")


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(FlmFormatError, match="cannot open"):
        read_flm(tmp_path / "nope.flm")


def test_unaligned_float_data_is_copied(tmp_path):
    w = np.arange(6, dtype=np.float32)
    (tmp_path / "u.flm").write_bytes(flm_file({}, [], [tensor_record("odd", w, "float32")]))  # name length 3
    flm = read_flm(tmp_path / "u.flm")
    assert flm.tensors["odd"].data_offset % 4 != 0
    assert flm.float_tensor(flm.tensors["odd"]).tolist() == w.tolist()


def test_kv_strings_survive(tmp_path):
    _write_sample(tmp_path / "a.flm")
    flm = read_flm(tmp_path / "a.flm")
    assert flm.kv["a"] == "é" and flm.kv["tokenizer_use_score"] == "1"
    assert struct.unpack("<i", (tmp_path / "a.flm").read_bytes()[:4]) == (2,)


@pytest.mark.parametrize("byte_level,marker,source", [
    (False, None, "rebuilt from vocab+scores (SentencePiece-style BPE)"),
    (True, None, "rebuilt from vocab+scores (byte-level BPE, gpt2 split)"),
    (True, ("<|begin_of_text|>", 128000), "rebuilt from vocab+scores (byte-level BPE, llama3 split)"),
])
def test_inspect_fastllm_file(tmp_path, capsys, byte_level, marker, source):
    """`flm inspect` on a fastllm-written file: keys, the tokenizer the runtime will rebuild, tensors."""
    from flm.cli import main

    vocab = [(b"a", 0, 1.0), (b"b", 1, 1.0), (b"ab", 2, 0.0)]
    if marker:
        vocab.append((marker[0].encode(), marker[1], 1.0))
    kv = {"model_type": "llama", "tokenizer_use_score": "1", "tokenizer_byte_as_char": str(byte_level)}
    tensors = [tensor_record(name, w, "int4g" if w.ndim == 2 else "float32", 32) for name, w in _weights().items()]
    (tmp_path / "f.flm").write_bytes(flm_file(kv, vocab, tensors))
    assert main(["inspect", str(tmp_path / "f.flm")]) == 0
    out = capsys.readouterr().out
    assert "version: 2" in out and "model_type" in out
    assert f"tokenizer: {len(vocab)} vocab entries, 0 special tokens, {source}" in out
    assert "a.weight" in out and "int4_group(g32)" in out and "norm.weight" in out
    assert "total tensor bytes:" in out and "1 float32, 1 int4_group" in out


def test_inspect_our_file(tmp_path, tiny_dir, capsys):
    from flm.cli import main
    from flm.convert import ConvertOptions, convert

    convert(tiny_dir, tmp_path / "m.flm", ConvertOptions(dtype="int8", progress=False))
    assert main(["inspect", str(tmp_path / "m.flm")]) == 0
    out = capsys.readouterr().out
    assert "tokenizer.json stored" in out and "model.layers.0.self_attn.q_proj.weight" in out and " int8 " in out


def _resident_file_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_prefault_maps_the_whole_file(tmp_path):
    """Loading a model maps every page at once (FlmFile.prefault) so that the first prompt does
    not fault its weights in 4 KB at a time: the file's pages count as resident right after."""
    import mmap

    with mmap.mmap(-1, 4096) as probe:
        try:
            probe.madvise(22)  # MADV_POPULATE_READ
        except (OSError, AttributeError):
            pytest.skip("this kernel cannot populate a mapping (Linux < 5.14)")
    weights = np.random.default_rng(2).normal(size=(2048, 2048)).astype(np.float32)  # 16 MB
    blob = flm_file({"model_type": "llama"}, [(b"a", 0, 0.0)], [tensor_record("big.weight", weights, "float32")])
    path = tmp_path / "big.flm"
    path.write_bytes(blob)
    flm = read_flm(path)
    before = _resident_file_mb()
    flm.prefault()
    assert _resident_file_mb() - before >= 0.75 * path.stat().st_size / 2**20  # unmapped: ~0
    flm.close()


def test_the_map_asks_for_huge_pages_before_the_parse(tmp_path, monkeypatch):
    """read_flm advises MADV_HUGEPAGE on its map before reading a byte of it: advised after the
    parse, the faults around each tensor header had already read most of a file from disk in
    4 KB folios, which decode streams slower than 2 MB ones."""
    import mmap

    import flm.format.flm as flm_format

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")
    events = []

    class Recording(mmap.mmap):
        def madvise(self, advice, *args):
            events.append(("madvise", advice))
            return super().madvise(advice, *args)

    real_parse = flm_format._parse
    monkeypatch.setattr(flm_format.mmap, "mmap", Recording)
    monkeypatch.setattr(flm_format, "_parse", lambda *a: events.append(("parse",)) or real_parse(*a))
    weights = np.ones((4, 32), dtype=np.float32)
    path = tmp_path / "small.flm"
    path.write_bytes(flm_file({"model_type": "llama"}, [(b"a", 0, 0.0)], [tensor_record("w", weights, "float32")]))
    read_flm(path).close()
    assert events[:2] == [("madvise", mmap.MADV_HUGEPAGE), ("parse",)]
