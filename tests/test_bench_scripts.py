"""The bench/ scripts run with bench/ first on sys.path (Python puts a script's own folder there):
none of their module names may hide an installed package that flm or its peers import."""

import importlib.util
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_module_hides_an_installed_package():
    hidden = [p.stem for p in BENCH.glob("*.py")
              if (spec := importlib.util.find_spec(p.stem)) is not None and Path(spec.origin or "").parent != BENCH]
    assert not hidden, f"bench/ modules named like installed packages: {hidden}"


def test_transformers_builds_a_model_from_a_bench_script():
    """transformers 5 imports a top-level `kernels` package where one is importable; a
    bench/kernels.py made bench/run.py fail at once."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,"
            " num_attention_heads=4, vocab_size=100))\n")
    result = subprocess.run([sys.executable, "-c", code, str(BENCH)], capture_output=True, text=True, cwd=BENCH)
    assert result.returncode == 0, result.stderr[-2000:]
