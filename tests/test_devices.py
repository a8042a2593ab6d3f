"""Device selection: CPU always; CUDA where torch sees a GPU (skipped cleanly elsewhere)."""

import pytest
import torch

from helpers import logits_close, needs_gpu
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.errors import FlmError

IDS = [1, 450, 4996, 17354, 1701, 29916, 432]
DTYPES = ["float32", "float16", "bfloat16", "int8", "int4", "int4g"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("dev")
    paths = {}
    for dtype in DTYPES:
        paths[dtype] = out / f"{dtype}.flm"
        convert(tiny_dir, paths[dtype], ConvertOptions(dtype=dtype, group_size=32, progress=False))
    return paths


def _logits(m):
    return m.backend.score(IDS).float().cpu()


def test_cuda_without_gpu_is_a_clear_error(files):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(FlmError, match="no CUDA GPU"):
        llm.model(files["float32"], device="cuda")


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x"])
def test_unknown_device_is_a_clear_error(files, device):
    with pytest.raises(FlmError, match="use 'cpu' or 'cuda'"):
        llm.model(files["float32"], device=device)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(files, dtype):
    cpu = _logits(llm.model(files[dtype], reference=True))
    gpu_model = llm.model(files[dtype], device="cuda")
    assert gpu_model.model.embed.device.type == "cuda"
    assert logits_close(_logits(gpu_model), cpu, 1e-3)
    assert gpu_model.response("Hello", max_length=4) == llm.model(files[dtype]).response("Hello", max_length=4)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "int4g"])
def test_cuda_batched_decode_matches_cpu(files, dtype):
    """Batched steps (the server's) on the GPU: sequences at different positions."""

    def run(m):
        caches = [m.backend.new_cache(32) for _ in range(3)]
        prompts = [IDS[:3], IDS, IDS[:5]]
        tokens = [int(m.backend.prefill(p, c).argmax()) for p, c in zip(prompts, caches)]
        out = []
        for _ in range(4):
            logits = m.backend.step(tokens, caches)
            tokens = logits.argmax(-1).tolist()
            out.append(logits.float().cpu())
        return torch.stack(out)

    assert logits_close(run(llm.model(files[dtype], device="cuda")), run(llm.model(files[dtype], reference=True)), 1e-3)


@needs_gpu
def test_cuda_streams_what_it_answers(files):
    model = llm.model(files["int8"], device="cuda")
    pieces = list(model.stream_response("Hello", max_length=6))
    assert "".join(pieces) == model.response("Hello", max_length=6)
