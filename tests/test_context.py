"""The context window: its default from the model's RoPE scaling, the length a user sets, and
prompts past the trained length (dynamic NTK recomputed as the sequence grows, as transformers
does)."""

import pytest
import torch

from helpers import edit_config, save_checkpoint, tiny_llama
from flm import llm
from flm.config import ModelConfig, RopeScaling
from flm.convert import ConvertOptions, convert
from flm.errors import ContextOverflowError
from flm.generate import SamplingConfig


def _config(max_pos: int, **scaling) -> ModelConfig:
    return ModelConfig("llama", 64, 128, 2, 4, 2, 100, max_position_embeddings=max_pos,
                       rope_scaling=RopeScaling(**scaling))


@pytest.mark.parametrize("cfg,window", [
    (_config(4096), 4096),
    (_config(48, kind="dynamic", factor=2.0), 96),  # the trained window, extended by its factor
    (_config(16384, kind="linear", factor=8.0), 16384),  # linear checkpoints name the scaled window
    (_config(131072, kind="llama3", factor=8.0, original_max_position_embeddings=8192), 131072),  # Llama 3.1
    (_config(32768, kind="yarn", factor=4.0, original_max_position_embeddings=32768), 131072),  # Qwen2.5 + YaRN
])
def test_default_window_follows_the_rope_scaling(cfg, window):
    assert cfg.context_window == window


@pytest.fixture(scope="module")
def xverse_256k_style(tmp_path_factory):
    """A tiny LLaMA in the cookbook's XVERSE-13B-256K spelling: flat rope keys, dynamic NTK
    factor 2 over a trained window of 48."""
    out = tmp_path_factory.mktemp("xverse")
    reference = tiny_llama(seed=7, max_position_embeddings=48,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 500000.0})
    src = save_checkpoint(reference, out / "hf")
    edit_config(src, rope_parameters=None, rope_scaling=None, rope_theta=500000,
                **{"rope_scaling.type": "dynamic", "rope_scaling.factor": 2.0})
    convert(src, out / "m.flm", ConvertOptions(dtype="float32", template="base", progress=False))
    return reference, out / "m.flm"


def test_prompts_past_the_trained_length_follow_transformers(xverse_256k_style):
    """An 80-token prompt (the trained window is 48) and 12 greedy tokens: transformers' tokens,
    on every backend the model takes here (its decode steps past 48 run the reference forward)."""
    reference, path = xverse_256k_style
    m = llm.model(path)
    assert m.backend.window == 96
    prompt = [1] + [(53 * i) % 31000 + 3 for i in range(79)]
    ours = list(m.generate_ids(prompt, SamplingConfig(max_length=12, top_k=1)))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    eos_token_id=reference.config.eos_token_id, pad_token_id=0)[0, 80:].tolist()
    assert len(ours) == 12 and ours == theirs


def test_a_window_the_user_sets_bounds_every_sequence(xverse_256k_style):
    _, path = xverse_256k_style
    m = llm.model(path, max_context_length=40)
    assert m.backend.window == 40 and m.get_max_input_len() == 39
    with pytest.raises(ContextOverflowError, match="the prompt has 45 tokens but the context window is 40"):
        list(m.generate_ids(list(range(3, 48)), SamplingConfig(max_length=4, top_k=1)))
    # an answer stops at the window: 30 prompt tokens leave room for 10
    assert len(list(m.generate_ids(list(range(3, 33)), SamplingConfig(max_length=64, top_k=1)))) <= 10
    cache = m.backend.new_cache(1000)  # never past the window
    assert cache.max_len == 40
    m.set_max_context_length(64)
    assert m.backend.window == 64 and m.backend.new_cache().max_len == 64
    with pytest.raises(ValueError, match="at least 1 token"):
        llm.model(path, max_context_length=0)


# Measured 2026-12-08 on tiny random LLaMAs, a 48-token prompt scored in one pass: float16
# 2.3-2.8e-4 of the logit range, bfloat16 2.2-2.4e-3, int8 6.8-7.2e-3 (argmax 94-96% the same)
KV_BOUNDS = {"float16": 5e-4, "bfloat16": 5e-3, "int8": 1.5e-2}


@pytest.mark.parametrize("kv", sorted(KV_BOUNDS))
def test_every_kv_dtype_against_the_float32_cache(tmp_path, tiny_dir, kv):
    """The same prompt through caches of each dtype: within the stated fraction of the logit
    range of the float32 cache's logits, and half (or a quarter) of its memory."""
    path = tmp_path / "m.flm"
    convert(tiny_dir, path, ConvertOptions(dtype="float32", template="base", progress=False))
    ids = [1] + [(97 * i) % 31000 + 3 for i in range(47)]
    exact, rounded = (llm.model(path, kv_cache_dtype=name).backend for name in ("float32", kv))
    want, got = exact.score(ids), rounded.score(ids)
    ranges = want.max(-1).values - want.min(-1).values
    assert float(((got - want).abs().max(-1).values / ranges).max()) <= KV_BOUNDS[kv]
    sizes = {name: backend.new_cache(64, initial=64).nbytes for name, backend in (("float32", exact), (kv, rounded))}
    cfg = exact.model.cfg
    scales = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 64 * 4 if kv == "int8" else 0  # a float32 per head row
    assert sizes[kv] == sizes["float32"] // (4 if kv == "int8" else 2) + scales


def test_kv_dtype_names_are_checked(tmp_path, tiny_dir):
    from flm.errors import FlmError

    path = tmp_path / "m.flm"
    convert(tiny_dir, path, ConvertOptions(dtype="float32", template="base", progress=False))
    with pytest.raises(FlmError, match="unknown KV cache dtype 'fp8'; choose one of float32, float16, bfloat16, int8"):
        llm.model(path, kv_cache_dtype="fp8")
    m = llm.model(path)
    m.set_kv_cache_dtype("int8")
    assert m.backend.new_cache(8).keys[0].dtype == torch.int8


def _tiny_backend(tmp_path, tiny_dir):
    path = tmp_path / "m.flm"
    convert(tiny_dir, path, ConvertOptions(dtype="float16", template="base", progress=False))
    return llm.model(path)


def test_chunked_prefill_gives_the_one_pass_tokens(tmp_path, tiny_dir):
    """A 40-token prompt in chunks of 7 (the last one 5) against one pass: the same greedy tokens
    and, after the prompt, the same logits to rounding."""
    from flm.generate import Sequence

    m = _tiny_backend(tmp_path, tiny_dir)
    prompt = [1] + [(53 * i) % 31000 + 3 for i in range(39)]
    runs = {}
    for chunk in (7, 4096):
        m.backend.prefill_chunk = chunk
        seq = Sequence(m.backend, prompt, SamplingConfig(max_length=16, top_k=1), set())
        first = logits = seq.prefill()
        assert seq.prefilled == len(prompt) and seq.cache.length == len(prompt)
        tokens = []
        while seq.finish_reason is None:
            tokens.append(seq.choose(logits))
            logits = seq.step(tokens[-1])
        runs[chunk] = first, tokens
    assert torch.allclose(runs[7][0], runs[4096][0], rtol=0, atol=1e-4 * float(runs[4096][0].abs().max()))
    assert runs[7][1] == runs[4096][1] and len(runs[7][1]) == 16


def test_a_long_prompt_joins_between_the_steps_of_running_streams(tmp_path, tiny_dir):
    """The scheduler prefills a joining prompt a chunk at a time, each between two decode steps
    of the running sequence: the stream's tokens keep coming while the prompt goes in."""
    import threading

    from flm.generate import Sequence
    from flm.server.scheduler import Job, Scheduler

    m = _tiny_backend(tmp_path, tiny_dir)
    m.backend.prefill_chunk = 8
    events, done = [], threading.Event()
    greedy = SamplingConfig(max_length=40, top_k=1)

    def emit(name):
        def record(token, reason):
            events.append((name, "token" if token is not None else reason))
            if reason is not None and name == "long":
                done.set()
        return record

    scheduler = Scheduler(m.backend, max_batch=4)
    stream = Job(Sequence(m.backend, [1, 450, 4996], greedy, set()), emit("stream"))
    long = Job(Sequence(m.backend, [1] + [(53 * i) % 31000 + 3 for i in range(63)], SamplingConfig(max_length=2, top_k=1),
                        set()), emit("long"))
    chunks = long.sequence.prefill_chunk
    long.sequence.prefill_chunk = lambda: events.append(("long", "chunk")) or chunks()
    scheduler.submit(stream)
    scheduler.start()
    try:
        while ("stream", "token") not in events:
            threading.Event().wait(0.01)
        scheduler.submit(long)
        assert done.wait(60)
    finally:
        scheduler.stop()
    order = [name for name, what in events if what in ("token", "chunk")]
    first, last = order.index("long"), len(order) - 1 - order[::-1].index("long")
    between = order[first:last + 1]
    assert between.count("long") == 8 + 2  # 64 prompt tokens in chunks of 8, then two answer tokens
    assert between.count("stream") >= 7  # a stream token between every two chunks
