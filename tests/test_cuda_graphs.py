"""The CUDA-graph decode step: its fixed-shape step (whole-cache attention with a mask, RoPE
from a table, keys written with index_copy_) against the eager step on the CPU, where it runs
without a graph; the recorded graph itself on a GPU (skipped without one)."""

import pytest
import torch

from checks import logits_close, needs_gpu
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.cuda_graphs import GraphedStep

PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("graphs")
    paths = {}
    for dtype in ("float32", "float16", "int8", "int4g"):
        paths[dtype] = out / f"{dtype}.flm"
        convert(tiny_dir, paths[dtype], ConvertOptions(dtype=dtype, group_size=32, template="base", progress=False))
    return paths


def _steps(model, steps: int, fixed_shape: bool, capacity: int = 32, initial: int | None = None) -> torch.Tensor:
    """Logits of greedy one-token steps after PROMPT: through forward(), or (fixed_shape) through
    the graph's step function called directly, as the warm-up before recording runs it."""
    cache = model.new_cache(1, capacity, initial=initial)
    token = int(model.forward(torch.tensor([PROMPT]), cache)[0, -1].argmax())
    graphed = GraphedStep(model, cache) if fixed_shape else None
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            if graphed is None:
                logits = model.forward(torch.tensor([[token]]), cache)
            else:
                graphed.token.fill_(token)
                graphed.position.fill_(cache.length)
                logits = graphed._step()
                cache.length += 1
            out.append(logits[0, -1].float().cpu())
            token = int(out[-1].argmax())
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 5])
def test_fixed_shape_step_equals_eager_step(files, window):
    model = llm.model(files["float32"], reference=True).model  # the layer-by-layer path
    model.cfg.sliding_window = window  # 5: shorter than the prompt, the mask must hide the oldest keys
    assert logits_close(_steps(model, 8, fixed_shape=True), _steps(model, 8, fixed_shape=False), 1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8", "int4g"])
def test_graph_replay_equals_eager_on_gpu(files, dtype):
    model = llm.model(files[dtype], device="cuda").model

    def run(graphs: bool) -> torch.Tensor:
        model.cuda_graphs = graphs
        # the cache starts at 16 slots and grows to 32 after the 11-token prompt: recorded again
        return _steps(model, 14, fixed_shape=False, capacity=64, initial=16)

    assert logits_close(run(True), run(False), 1e-4)


@needs_gpu
def test_graph_is_recorded_once_per_cache_storage(files):
    model = llm.model(files["float16"], device="cuda").model
    cache = model.new_cache(1, 64, initial=12)
    model.forward(torch.tensor([PROMPT]), cache)
    model.forward(torch.tensor([[5]]), cache)
    first = cache.graph_step
    assert first is not None and first.graph is not None
    model.forward(torch.tensor([[6]]), cache)  # 13 tokens: the cache grows, the old graph wrote elsewhere
    assert cache.graph_step is not None and cache.graph_step is not first
    model.forward(torch.tensor([[7]]), cache)
    assert cache.graph_step.graph is not None
