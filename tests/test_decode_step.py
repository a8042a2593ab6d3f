"""The C++ decode step (every layer of a one-token step in one call) against the layer-by-layer
torch path on the same weights: every dtype, grouped-query attention, biases, a sliding window,
one sequence and several at different positions."""

import pytest
import torch

from conftest import save_checkpoint, tiny_llama
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.kernels.decode import build_decode_step
from flm.kernels.native import cpu_isa

pytestmark = pytest.mark.skipif(cpu_isa() is None, reason="CPU has neither AVX-512 nor AVX2+FMA+F16C")

PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366]


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory):
    """q/k/v/o and MLP biases, 4 query heads over 2 KV heads."""
    model = tiny_llama(seed=3, attention_bias=True, mlp_bias=True)
    return save_checkpoint(model, tmp_path_factory.mktemp("biased"))


def _load(tmp_path, source, dtype):
    path = tmp_path / f"{dtype}.flm"
    convert(source, path, ConvertOptions(dtype=dtype, group_size=32, template="base", progress=False))
    m = llm.model(path)
    assert m.model.decode_step is not None, "every layer should be on the SIMD kernels"
    assert m.model.decode_step.has_head, "the output layer too"
    return m.model


def _decode(model, prompt, steps, initial=None):
    """Logits of `steps` greedy one-token steps after `prompt`, with whatever path the model has."""
    cache = model.new_cache(1, 64, initial=initial)
    logits = model.forward(torch.tensor([prompt]), cache)[0, -1]
    out = []
    for _ in range(steps):
        logits = model.forward(torch.tensor([[int(logits.argmax())]]), cache)[0, -1]
        out.append(logits)
    assert initial is None or cache.capacity > initial  # the test meant the cache to grow
    return torch.stack(out)


def _same_both_ways(model, run, dtype: str = "float32"):
    """run() with the C++ step, then on the layer-by-layer path: the same logits. int4 linears
    round their input to a 16-bit grid (quant.round_input_int16): a last-bit difference upstream
    can move a value across a rounding boundary, one grid step (1/32767 of its row's largest)."""
    fast = run()
    model.decode_step = None
    ref = run()
    span = float(ref.max() - ref.min())
    relative = 1e-4 if dtype.startswith("int4") else 2e-5
    assert float((fast - ref).abs().max()) <= relative * span + 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8", "int4", "int4g"])
@pytest.mark.parametrize("source", ["tiny_dir", "biased_dir"])
def test_step_equals_layer_by_layer(request, tmp_path, dtype, source):
    model = _load(tmp_path, request.getfixturevalue(source), dtype)
    _same_both_ways(model, lambda: _decode(model, PROMPT, 8), dtype)


@pytest.mark.parametrize("head_dim", [12, 24])
def test_head_sizes_off_the_vector_width_and_a_long_context(tmp_path, head_dim):
    """Head sizes that 8 and 16 lanes do not divide (attention's partial vectors; 24: whole
    vectors and a rest) and more cached positions than one block of key rows (the blocks' sums
    carried from one to the next)."""
    model = tiny_llama(seed=5, num_attention_heads=96 // head_dim * 2, num_key_value_heads=2, head_dim=head_dim)
    model = _load(tmp_path, save_checkpoint(model, tmp_path / "hf"), "float32")
    prompt = [1] + [(97 * i) % 31000 + 3 for i in range(50)]
    _same_both_ways(model, lambda: _decode(model, prompt, 5))


@pytest.mark.parametrize("dtype", ["float16", "int4g"])
def test_output_layer_in_the_step_equals_it_after(tmp_path, tiny_dir, dtype):
    """The final norm and output layer inside the C++ call (step_logits) against the step
    followed by them in Python: the same logits but for the norm's summation order."""
    model = _load(tmp_path, tiny_dir, dtype)
    inside = _decode(model, PROMPT, 6)
    model.decode_step.has_head = False
    after = _decode(model, PROMPT, 6)
    torch.testing.assert_close(inside, after, rtol=1e-5, atol=1e-5 * float(after.abs().max()))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int8"])
def test_token_ids_in_the_step_equal_embedded_rows(tmp_path, tiny_dir, dtype):
    """token_logits looks the embedding row (stored float32/fp16/bf16 bytes, or a quantized
    table's widened rows) and the rotary rows up in C++: bit for bit what the torch lookups give."""
    model = _load(tmp_path, tiny_dir, dtype)
    assert model.decode_step.takes_tokens
    inside = _decode(model, PROMPT, 6)
    model.decode_step.takes_tokens = False
    torch.testing.assert_close(_decode(model, PROMPT, 6), inside, rtol=0, atol=0)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tiny_dir):
    model = _load(tmp_path, tiny_dir, "float16")
    cache = model.new_cache(1, 64)
    model.forward(torch.tensor([PROMPT]), cache)
    with pytest.raises(ValueError, match="token id outside"):
        model.forward(torch.tensor([[model.cfg.vocab_size]]), cache)
    assert cache.length == len(PROMPT)


def test_sliding_window(tmp_path, tiny_dir):
    model = _load(tmp_path, tiny_dir, "float32")
    model.cfg.sliding_window = 4  # shorter than the prompt: the step must drop the oldest keys
    model.decode_step = build_decode_step(model.cfg, model.layers, model.norm, model.lm_head)
    _same_both_ways(model, lambda: _decode(model, PROMPT, 6))


@pytest.mark.parametrize("dtype", ["float16", "int4g"])
def test_batched_sequences_at_different_positions(tmp_path, tiny_dir, dtype):
    """decode_batch: each sequence writes and attends at its own position in its own cache."""
    model = _load(tmp_path, tiny_dir, dtype)

    def run():
        caches = [model.new_cache(1, 64) for _ in range(3)]
        prompts = [PROMPT[:3], PROMPT, PROMPT[:7]]
        tokens = [int(model.forward(torch.tensor([p]), c)[0, -1].argmax()) for p, c in zip(prompts, caches)]
        out = []
        for _ in range(5):
            logits = model.decode_batch(tokens, caches)
            tokens = logits.argmax(-1).tolist()
            out.append(logits)
        return torch.stack(out)

    _same_both_ways(model, run, dtype)


def test_batch_of_rows_in_one_cache(tmp_path, tiny_dir):
    """forward() with two sequences in one cache, one token each."""
    model = _load(tmp_path, tiny_dir, "bfloat16")

    def run():
        cache = model.new_cache(2, 64)
        model.forward(torch.tensor([PROMPT, PROMPT[::-1]]), cache)
        return model.forward(torch.tensor([[5], [7]]), cache)

    _same_both_ways(model, run)


def test_cache_growth_keeps_the_step_writing_to_the_live_cache(tmp_path, tiny_dir):
    """Growing the cache replaces its tensors; the step must write to the new ones."""
    model = _load(tmp_path, tiny_dir, "float32")
    _same_both_ways(model, lambda: _decode(model, PROMPT, 6, initial=12))  # grows from 12 past 16


def test_two_threads_share_one_model(tmp_path, tiny_dir):
    """The step releases the GIL and keeps scratch buffers: concurrent callers must not mix."""
    from concurrent.futures import ThreadPoolExecutor

    model = _load(tmp_path, tiny_dir, "float16")
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:], PROMPT[:5]]
    alone = [_decode(model, p, 12) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: _decode(model, p, 12), prompts))
    for a, b in zip(alone, together):
        assert torch.equal(a, b)
