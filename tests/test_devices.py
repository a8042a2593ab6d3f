"""Device selection: CPU always; CUDA where torch sees a GPU (skipped cleanly elsewhere)."""

import pytest
import torch

from flm import llm
from flm.convert import ConvertOptions, convert
from flm.errors import FlmError

IDS = [1, 450, 4996, 17354, 1701, 29916, 432]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("dev")
    paths = {}
    for dtype in ("float32", "float16", "int8", "int4g"):
        paths[dtype] = out / f"{dtype}.flm"
        convert(tiny_dir, paths[dtype], ConvertOptions(dtype=dtype, group_size=32, progress=False))
    return paths


def _logits(m):
    return m.model.forward(torch.tensor([IDS]), m.model.new_cache(1, 16), last_only=False)[0].float().cpu()


def test_cuda_without_gpu_is_a_clear_error(files):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FlmError, match="no CUDA GPU"):
        llm.model(files["float32"], device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4g"])
def test_cuda_matches_cpu(files, dtype):
    cpu = _logits(llm.model(files[dtype], reference=True))
    gpu_model = llm.model(files[dtype], device="cuda")
    gpu = _logits(gpu_model)
    assert float((gpu - cpu).abs().max()) <= 1e-3 * float(cpu.max() - cpu.min())
    assert gpu_model.response("Hello", max_length=4) == llm.model(files[dtype]).response("Hello", max_length=4)
