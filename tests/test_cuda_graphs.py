"""The CUDA-graph decode step: its fixed-shape step (RoPE from a table; attention either in
Triton's fused kernels, run here by its interpreter, or whole-cache torch ops with a mask and
keys written with index_copy_) against the eager step on the CPU, where it runs without a
graph; the fused kernels against the torch formulas; the recorded graph itself on a GPU
(skipped without one)."""

import gc
import weakref

import pytest
import torch

from checks import logits_close, needs_gpu
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.cuda_graphs import GraphedBatch, GraphedStep
from flm.kernels import triton_decode
from flm.model import _single_query_attention
from flm.rope import apply_rotary

needs_triton = pytest.mark.skipif(triton_decode.triton is None, reason="Triton is not installed (pip install triton)")

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
    graphed = GraphedStep(model, cache, model.rotary.tables(cache.capacity, cache.keys[0].device)) if fixed_shape else None
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


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=needs_triton)])
@pytest.mark.parametrize("window", [None, 5])
def test_fixed_shape_step_equals_eager_step(files, window, fused):
    # the layer-by-layer path; Triton's kernels run compiled on a GPU, else in its interpreter
    device = "cuda" if fused and torch.cuda.is_available() else "cpu"
    model = llm.model(files["float32"], reference=True, device=device).model
    model.cfg.sliding_window = window  # 5: shorter than the prompt, the mask must hide the oldest keys
    model.fused_attention = fused
    assert logits_close(_steps(model, 8, fixed_shape=True), _steps(model, 8, fixed_shape=False), 1e-5)


def _served(model, steps: int, step) -> torch.Tensor:
    """Logits of greedy batched steps as the server runs them: three sequences at different
    positions whose caches (initially 8 slots) grow at different steps; after three steps the
    second leaves and a fourth, fresh one takes the first place, so the same batch size meets
    other caches. step(tokens, caches) -> logits [batch, vocab]."""
    caches = [model.new_cache(1, 64, initial=8) for _ in range(3)]
    prompts = [PROMPT[:3], PROMPT, PROMPT[:7]]
    tokens = [int(model.forward(torch.tensor([p]), c)[0, -1].argmax()) for p, c in zip(prompts, caches)]
    out = []
    for i in range(steps):
        if i == 3:
            fresh = model.new_cache(1, 64, initial=8)
            caches = [fresh, caches[0], caches[2]]
            tokens = [int(model.forward(torch.tensor([PROMPT[:5]]), fresh)[0, -1].argmax()), tokens[0], tokens[2]]
        logits = step(tokens, caches)
        tokens = logits.argmax(-1).tolist()
        out.append(logits.float().cpu())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["step", pytest.param("batch", marks=needs_triton)])
def test_dropped_graphs_go_without_the_cycle_collector(files, kind):
    """A graphed step that its cache or model lets go of must be freed at once: left to the
    cycle collector, it could be freed in the middle of another graph's capture, which that
    invalidates (cuda_graphs._record)."""
    model = llm.model(files["float32"], reference=True).model
    cache = model.new_cache(1, 16)
    tables = model.rotary.tables(16, cache.keys[0].device)
    made = GraphedStep(model, cache, tables) if kind == "step" else GraphedBatch(model, [cache], tables)
    gone = weakref.ref(made)
    gc.disable()
    try:
        del made
        assert gone() is None
    finally:
        gc.enable()


@needs_triton
def test_batch_graph_step_equals_eager_batched_decode(files):
    """The graphed batch's step function called directly (as its warm-up before recording),
    its address table refilled for each step's caches, against decode_batch's torch spelling."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llm.model(files["float32"], reference=True, device=device).model
    graphed = None

    def fixed_shape(tokens, caches):
        nonlocal graphed
        for cache in caches:
            cache.reserve(cache.length + 1)
        tables = model.rotary.tables(64, caches[0].keys[0].device)
        graphed = graphed or GraphedBatch(model, caches, tables)  # one for every step: the table is refilled
        graphed.fill(tokens, caches)
        with torch.inference_mode():
            logits = graphed._step()
        for cache in caches:
            cache.length += 1
        return logits[:, 0]

    model.fused_attention = True
    got = _served(model, 6, fixed_shape)
    model.fused_attention = False
    assert logits_close(got, _served(model, 6, model.decode_batch), 1e-5)


@needs_triton
@pytest.mark.parametrize("window", [None, 5])
def test_fused_batched_decode_equals_torch_batched_decode(files, window):
    """decode_batch (the server's step) through the fused kernels, one launch per layer for
    all sequences, against its torch spelling."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = llm.model(files["float32"], reference=True, device=device).model
    model.cfg.sliding_window = window

    def run(fused: bool) -> torch.Tensor:
        model.fused_attention = fused
        return _served(model, 6, model.decode_batch)

    assert logits_close(run(True), run(False), 1e-5)


@needs_triton
@pytest.mark.parametrize("dim", [16, 24])  # 24: neither half nor whole a power of two (masked lanes)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("position", [0, 3, 31, 32, 39])  # 31/32: the ends of the first block of slots
def test_fused_attention_kernels_equal_torch_formulas(dim, window, position):
    """One launch for three sequences, each with its own cache (capacities 40, 48, 33) and
    position (the parametrized one, 17 and 0), two layers: each written and read in its own."""
    torch.manual_seed(position)
    heads, kv_heads, layers = 6, 2, 2
    capacities, positions = [40, 48, 33], [position, 17, 0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    keys = [[torch.randn(1, kv_heads, c, dim, device=device) for _ in range(layers)] for c in capacities]
    values = [[torch.randn(1, kv_heads, c, dim, device=device) for _ in range(layers)] for c in capacities]
    want_keys, want_values = ([[t.clone() for t in seq] for seq in store] for store in (keys, values))
    qkv = torch.randn(len(capacities), 1, (heads + 2 * kv_heads) * dim, device=device)
    cos, sin = torch.randn(2, 64, dim, device=device)

    caches = triton_decode.CacheAddresses(keys, values)
    pos = torch.tensor(positions, device=device)
    q = triton_decode.rotary_store(qkv, cos, sin, pos, caches, 1, heads)
    attn = triton_decode.decode_attention(q, caches, 1, pos, window)

    for s, (p, capacity) in enumerate(zip(positions, capacities)):
        q_ref, k_ref, v_ref = (t.reshape(1, 1, -1, dim).transpose(1, 2)
                               for t in qkv[s].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1))
        q_ref = apply_rotary(q_ref, cos[p][None, None], sin[p][None, None])
        want_keys[s][1][:, :, p] = apply_rotary(k_ref, cos[p][None, None], sin[p][None, None])[:, :, 0]
        want_values[s][1][:, :, p] = v_ref[:, :, 0]
        slots = torch.arange(capacity, device=device)
        visible = (slots <= p) & (slots > p - window if window else True)
        want = _single_query_attention(q_ref, want_keys[s][1], want_values[s][1], visible=visible)[0, :, 0]
        torch.testing.assert_close(q[s], q_ref[0, :, 0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(attn[s], want, rtol=1e-5, atol=1e-5)
        for layer in range(layers):  # layer 0 untouched
            torch.testing.assert_close(keys[s][layer], want_keys[s][layer], rtol=1e-6, atol=1e-6)
            assert torch.equal(values[s][layer], want_values[s][layer])


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


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "int4g"])
def test_batch_graph_replay_equals_eager_on_gpu(files, dtype):
    model = llm.model(files[dtype], device="cuda").model

    def run(graphs: bool) -> torch.Tensor:
        model.graph_batches = graphs
        return _served(model, 6, model.decode_batch)

    assert logits_close(run(True), run(False), 1e-4)
    recorded = model.batch_graphs[3]
    assert recorded.graph is not None
    run(True)  # other caches, grown at other steps: the same recording replays
    assert model.batch_graphs[3] is recorded
