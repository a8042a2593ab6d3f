"""The .flm reader under mutation: every mutant loads correctly or raises FlmFormatError."""

import pytest

from fuzz_flm import run

pytestmark = pytest.mark.slow


def test_fuzz_5000_mutants(capsys):
    report = run(5200)
    with capsys.disabled():
        print(f"\nfuzz: {report}")
    assert report["files"] >= 5000
    assert report["rejected"] > 1000 and report["ok"] > 0  # both paths exercised


def test_hypothesis_edits(tmp_path):
    """hypothesis-driven edits (splices of arbitrary bytes) on top of the enumerated mutants."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from fuzz_flm import check_one, sample_file

    blob = sample_file(tmp_path)
    target = tmp_path / "h.flm"

    @settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, len(blob)), st.integers(0, 64), st.binary(max_size=64))
    def check(offset, removed, inserted):
        target.write_bytes(blob[:offset] + inserted + blob[offset + removed:])
        assert check_one(target) in ("ok", "rejected")

    check()


def test_sentencepiece_reader_under_edits():
    """tokenizer.model bytes spliced at random: a parsed model or a CheckpointError, nothing else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from flm.errors import CheckpointError
    from flm.format.sentencepiece import parse_sentencepiece_model
    from sentencepiece_proto import encode_model

    blob = encode_model([("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("\u2581a", -1.0, 1), ("\u4f60", -2.0, 1)])

    @settings(max_examples=500, deadline=1000)
    @given(st.integers(0, len(blob)), st.integers(0, 16), st.binary(max_size=16))
    def check(offset, removed, inserted):
        try:
            model = parse_sentencepiece_model(blob[:offset] + inserted + blob[offset + removed:])
        except CheckpointError:
            return
        assert all(isinstance(p.text, str) and isinstance(p.score, float) for p in model.pieces)

    check()
