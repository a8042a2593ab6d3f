"""The .flm reader under mutation: every mutant loads correctly or raises FlmFormatError."""

from fuzz_flm import run


def test_fuzz_5000_mutants(capsys):
    report = run(5200)
    with capsys.disabled():
        print(f"\nfuzz: {report}")
    assert report["files"] >= 5000
    assert report["rejected"] > 1000 and report["ok"] > 0  # both paths exercised
