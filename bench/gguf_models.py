"""GGUF files for the llama.cpp side of the benchmark, made with llama.cpp's own tools: its
`convert_hf_to_gguf.py` (from the llama-cpp-python source distribution matching the installed
version, fetched once from PyPI) writes F16, and llama.cpp's quantizer (through
llama-cpp-python's `llama_model_quantize`) makes Q8_0, Q4_0 and Q4_1 from it."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_1": 3}


def _llama_cpp_tools(cache: Path) -> Path:
    import llama_cpp

    root = cache / f"llama-cpp-python-{llama_cpp.__version__}"
    script = root / "convert_hf_to_gguf.py"
    if script.exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(cache)], check=True)
    sdist = next(cache.glob(f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"))
    prefix = f"llama_cpp_python-{llama_cpp.__version__}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(prefix) and (name == prefix + "convert_hf_to_gguf.py" or
                                            name.startswith(prefix + "gguf-py/") or
                                            name.startswith(prefix + "conversion/")) and member.isfile():
                target = root / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    sdist.unlink()
    return root


def gguf_for(model_dir: Path, kind: str, out_dir: Path) -> Path:
    """The GGUF of `model_dir` in llama.cpp type `kind` (F16, Q8_0, Q4_0, Q4_1), built once."""
    import llama_cpp

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-F16.gguf"
    if not f16.exists():
        tools = _llama_cpp_tools(out_dir.parent / "llama-cpp-tools")
        env = {**os.environ, "PYTHONPATH": str(tools / "gguf-py")}
        done = subprocess.run([sys.executable, str(tools / "convert_hf_to_gguf.py"), str(model_dir), "--outtype",
                               "f16", "--outfile", str(f16) + ".partial"], env=env, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. LLaMA vocabularies need `pip install sentencepiece`
            raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed: {done.stderr.strip()[-300:]}")
        os.replace(str(f16) + ".partial", f16)
    if kind == "F16":
        return f16
    target = out_dir / f"model-{kind}.gguf"
    if not target.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[kind]
        params.nthread = os.cpu_count() or 2
        code = llama_cpp.llama_model_quantize(str(f16).encode(), (str(target) + ".partial").encode(), params)
        if code != 0:
            raise RuntimeError(f"llama.cpp quantization to {kind} failed ({code})")
        os.replace(str(target) + ".partial", target)
    return target
