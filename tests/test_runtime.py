"""The runtime against transformers on the same weights: logits, greedy tokens, API semantics."""

import pytest
import torch

from helpers import logits_close
from helpers import save_checkpoint, tiny_llama
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.errors import ContextOverflowError, FlmFormatError, TemplateError
from flm.generate import SamplingConfig, apply_repeat_penalty, sample_next

PROMPT_IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3492, 526]


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _hf_greedy(model, ids, n):
    """transformers' greedy continuation, stopping at the model's EOS as flm does."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=model.config.eos_token_id, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny_flm(tmp_path_factory, tiny_dir):
    path = tmp_path_factory.mktemp("rt") / "tiny-f32.flm"
    convert(tiny_dir, path, ConvertOptions(dtype="float32", template="base", progress=False))
    return path


def _flm_logits(m, ids):
    return m.backend.score(ids)


def test_float32_logits_match_transformers(tiny_flm, tiny_model):
    m = llm.model(tiny_flm)
    ours, theirs = _flm_logits(m, PROMPT_IDS), _hf_logits(tiny_model, PROMPT_IDS)
    assert logits_close(ours, theirs, 1e-4)


def test_greedy_matches_transformers(tiny_flm, tiny_model):
    m = llm.model(tiny_flm)
    ours = list(m.generate_ids(PROMPT_IDS, SamplingConfig(max_length=24, top_k=1)))
    assert ours == _hf_greedy(tiny_model, PROMPT_IDS, 24)
    assert len(ours) == 24  # no early EOS: the comparison covers every step


@pytest.mark.parametrize("kind,extra", [
    ("linear", {"factor": 2.0}), ("dynamic", {"factor": 2.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_rope_scaling_matches_transformers(tmp_path, kind, extra):
    """Including positions past max_position_embeddings, where dynamic NTK changes the base."""
    rope = {"rope_type": kind, "rope_theta": 10000.0, **extra}
    model = tiny_llama(seed=5, max_position_embeddings=16, rope_parameters=rope)
    src = save_checkpoint(model, tmp_path / kind)
    convert(src, tmp_path / "r.flm", ConvertOptions(dtype="float32", progress=False))
    m = llm.model(tmp_path / "r.flm", max_context_length=64)  # positions past every trained window
    ids = (PROMPT_IDS * 3)[:40]
    ours = m.backend.score(ids)
    theirs = _hf_logits(model, ids)
    assert logits_close(ours, theirs, 1e-4)


def test_rotary_table_rows_equal_computed_ones():
    """cos/sin come from a table that grows by doubling (256 rows, then 512 for position 300);
    dynamic NTK past the trained length computes them for that length instead."""
    from flm.config import ModelConfig, RopeScaling
    from flm.rope import Rotary

    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=32, head_dim=32, max_position_embeddings=1024)
    rotary = Rotary(ModelConfig(**base))
    for positions in ([[3, 7]], [[300]], [[0, 255, 511]]):
        positions = torch.tensor(positions)
        got = rotary.cos_sin(positions)
        want = rotary._computed(positions, rotary.inv_freq)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert rotary._tables[torch.device("cpu")][0].shape == (512, 32)
    dynamic = Rotary(ModelConfig(**{**base, "max_position_embeddings": 16}, rope_scaling=RopeScaling(kind="dynamic", factor=2.0)))
    positions = torch.tensor([[40]])
    torch.testing.assert_close(dynamic.cos_sin(positions)[0], dynamic._computed(positions, dynamic.inv_freq_for(41))[0])
    assert not dynamic._tables


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_other_dtypes_track_float32(tmp_path, tiny_dir, tiny_flm, dtype):
    convert(tiny_dir, tmp_path / "q.flm", ConvertOptions(dtype=dtype, group_size=32, template="base", progress=False))
    ref = _flm_logits(llm.model(tiny_flm), PROMPT_IDS)
    ours = _flm_logits(llm.model(tmp_path / "q.flm"), PROMPT_IDS)
    agree = float((ours.argmax(-1) == ref.argmax(-1)).float().mean())
    assert agree >= {"float16": 0.99, "bfloat16": 0.85}.get(dtype, 0.85), agree  # 16 positions, random weights


@pytest.mark.parametrize("dtype", ["int8", "int4", "int4g"])
def test_quantized_model_equals_transformers_on_dequantized_weights(monkeypatch, tmp_path, tiny_dir, tiny_model, dtype):
    """The runtime computes exactly with the weights the file stores (fastllm's formula); prompts
    in float32 (on AVX512-BF16 CPUs they default to bf16 arithmetic: test_prefill_bf16.py)."""
    import copy

    monkeypatch.setenv("FLM_PREFILL", "float32")

    from flm.format.flm import read_flm
    from flm.quant import dequantize

    convert(tiny_dir, tmp_path / "q.flm", ConvertOptions(dtype=dtype, group_size=32, progress=False))
    flm = read_flm(tmp_path / "q.flm")
    reference = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            rec = flm.tensors[name]
            if rec.quantized:
                param.copy_(dequantize(flm.quantized(rec), rec.dims))
    ours = _flm_logits(llm.model(tmp_path / "q.flm"), PROMPT_IDS)
    theirs = _hf_logits(reference, PROMPT_IDS)
    assert logits_close(ours, theirs, 1e-4)


@pytest.mark.parametrize("prefill", ["float32", "bfloat16"])
def test_int8_kernel_equals_reference(monkeypatch, tmp_path, tiny_dir, prefill):
    """The prompt's logits: float32 prefill to 1e-4; bf16 prefill (the default on AVX512-BF16
    CPUs, else float32 too) within what rounding x to bf16 moves them."""
    monkeypatch.setenv("FLM_PREFILL", prefill)
    convert(tiny_dir, tmp_path / "q.flm", ConvertOptions(dtype="int8", progress=False))
    fast = _flm_logits(llm.model(tmp_path / "q.flm"), PROMPT_IDS)
    ref = _flm_logits(llm.model(tmp_path / "q.flm", reference=True), PROMPT_IDS)
    if prefill == "float32":
        assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)
    else:
        assert logits_close(fast, ref, 1e-2)


def test_prompt_building_fastllm_style(tmp_path, tiny_dir):
    convert(tiny_dir, tmp_path / "c.flm", ConvertOptions(dtype="float32", template="llama2-chat", progress=False))
    m = llm.model(tmp_path / "c.flm")
    prompt = m.get_prompt("How are you?", [("Hi", "Hello!")])
    assert prompt == "<FLM_FIX_TOKEN_1>[INST] Hi [/INST]Hello! <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>[INST] How are you? [/INST]"
    ids = m.encode_prompt(prompt)
    assert ids[0] == 1 and ids.count(1) == 2 and 2 in ids
    assert m.tokenizer_encode_string("Hello") == m.tokenizer.encode("Hello") and 1 not in m.tokenizer_encode_string("Hello")


def test_response_api_and_streaming(tiny_flm):
    m = llm.model(tiny_flm)
    pieces = list(m.stream_response("Hello", max_length=8))
    assert "".join(pieces) == m.response("Hello", max_length=8)
    cumulative = list(m.stream_response("Hello", max_length=8, one_by_one=False))
    assert cumulative[-1] == "".join(pieces)
    raw = b"".join(m.stream_response_raw(m.encode_prompt("Hello"), max_length=8))
    assert raw.decode("utf-8", errors="replace").strip() == "".join(pieces).strip()
    logits = m.response_logits("Hello")
    assert len(logits) == 32000


def test_stop_tokens_and_max_length(tiny_flm):
    m = llm.model(tiny_flm)
    ids = m.encode_prompt("Hello")
    first = list(m.generate_ids(ids, SamplingConfig(max_length=6)))
    assert len(first) == 6
    stopped = list(m.generate_ids(ids, SamplingConfig(max_length=6, stop_token_ids=[first[2]])))
    assert stopped == first[: first.index(first[2])]


def test_sampling_is_seeded_and_bounded():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    cfg = SamplingConfig(do_sample=True, top_k=2, top_p=1.0, temperature=0.7, seed=3)
    gen = torch.Generator().manual_seed(3)
    draws = {sample_next(logits, torch.tensor([], dtype=torch.long), cfg, gen) for _ in range(50)}
    assert draws <= {1, 2} and len(draws) == 2
    assert sample_next(logits, torch.tensor([], dtype=torch.long), SamplingConfig(top_k=1), None) == 1
    assert sample_next(logits, torch.tensor([], dtype=torch.long), SamplingConfig(do_sample=False, top_k=50), None) == 1
    tight = SamplingConfig(do_sample=True, top_k=4, top_p=0.5)
    assert {sample_next(logits, torch.tensor([], dtype=torch.long), tight, gen) for _ in range(30)} == {1}


def test_repeat_penalty_is_transformers_definition():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repeat_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_context_overflow_is_clear(tiny_flm):
    m = llm.model(tiny_flm)
    with pytest.raises(ContextOverflowError, match="context window is 256"):
        list(m.generate_ids([5] * 300, SamplingConfig(max_length=4)))


def test_fix_token_errors(tiny_flm):
    m = llm.model(tiny_flm)
    with pytest.raises(TemplateError, match="outside the vocabulary"):
        m.encode_prompt("<FLM_FIX_TOKEN_99999>")
    with pytest.raises(TemplateError, match="unclosed"):
        m.encode_prompt("hi <FLM_FIX_TOKEN_12")


def test_interrupted_stream_leaves_model_usable(tiny_flm):
    m = llm.model(tiny_flm)
    expected = m.response("Hello", max_length=6)
    stream = m.stream_response("Hello", max_length=50)
    next(stream)
    stream.close()  # what Ctrl-C does to a generator
    assert m.response("Hello", max_length=6) == expected


def test_save_round_trip(tmp_path, tiny_flm):
    m = llm.model(tiny_flm)
    m.save(tmp_path / "again.flm")
    assert (tmp_path / "again.flm").read_bytes() == tiny_flm.read_bytes()


def test_tensor_shape_mismatch_is_typed(tmp_path, tiny_flm):
    from flm.format.flm import read_flm

    flm = read_flm(tiny_flm)
    kv = dict(flm.kv)
    kv["flm.config"] = kv["flm.config"].replace('"intermediate_size": 128', '"intermediate_size": 96')
    from flm.format.flm import FlmWriter

    with FlmWriter(tmp_path / "bad.flm") as writer:
        writer.write_header(kv, flm.vocab, flm.special_tokens)
        writer.begin_tensors(len(flm.tensors))
        for rec in flm.tensors.values():
            writer.copy_tensor(flm, rec)
    with pytest.raises(FlmFormatError, match="mlp.gate_proj.weight has shape"):
        llm.model(tmp_path / "bad.flm")


def test_cpu_threads():
    before = llm.get_cpu_threads()
    llm.set_cpu_threads(1)
    assert llm.get_cpu_threads() == 1
    llm.set_cpu_threads(before)


@pytest.mark.parametrize("writer", ["torch2flm", "c++ save"])
def test_fastllm_written_file_without_tokenizer_json(tmp_path, writer):
    """A file laid out as fastllm's torch2flm writes it: HF names, float32 norms/embeddings,
    fastllm vocab+scores, str() of every config attribute (here transformers 5's: RoPE base and
    scaling only inside `rope_parameters`, as for DeepSeek Coder's 100000 and linear 4) and no flm.*
    keys. fastllm's C++ `save` (WeightMap::SaveLowBitModel) writes its vocab in hash-map order,
    its keys sorted and the embedding as truncated bfloat16."""
    import random

    import numpy as np

    from fastllm_layout import flm_file, tensor_record, torch2flm_kv
    from flm.tokenization.tokenizer import fastllm_vocab_from_tokenizer_json, load_tokenizer_json
    from helpers import LLAMA2_TOKENIZER, tiny_llama

    reference = tiny_llama(rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    reference.config.architectures = ["LlamaForCausalLM"]  # as from_pretrained sets it
    vocab = fastllm_vocab_from_tokenizer_json(load_tokenizer_json((LLAMA2_TOKENIZER / "tokenizer.json").read_text()))
    kv = {**torch2flm_kv(reference), "tokenizer_use_score": "1", "tokenizer_add_dummy_prefix": "True",
          "pre_prompt": "", "user_role": "", "bot_role": "", "history_sep": ""}
    assert "rope_theta" not in kv and "100000.0" in kv["rope_parameters"]
    entries = [(e.piece, e.token_id, e.score) for e in vocab.entries]
    if writer == "c++ save":
        random.Random(0).shuffle(entries)
        kv = dict(sorted(kv.items()))
    tensors = []
    with torch.no_grad():
        for name, t in reference.state_dict().items():
            linear = name.endswith("_proj.weight") or name == "lm_head.weight"
            embedding = writer == "c++ save" and name.endswith("embed_tokens.weight")
            dtype = "float16" if linear else "bfloat16" if embedding else "float32"
            tensors.append(tensor_record(name, t.numpy().astype(np.float32), dtype))
            if dtype == "float16":  # the reference computes with the weights as stored
                t.copy_(t.half().float())
            elif dtype == "bfloat16":
                t.copy_((t.view(torch.int32) & -65536).view(torch.float32))  # truncated, as written
    (tmp_path / "fastllm.flm").write_bytes(flm_file(kv, entries, tensors))
    m = llm.model(tmp_path / "fastllm.flm")
    assert (m.config.rope_theta, m.config.rope_scaling.kind, m.config.rope_scaling.factor) == (100000.0, "linear", 4.0)
    assert m.config.architectures == ["LlamaForCausalLM"]
    assert m.tokenizer.encode("Hello world, how are you?") == [15043, 3186, 29892, 920, 526, 366, 29973]
    ours = _flm_logits(m, PROMPT_IDS)
    theirs = _hf_logits(reference, PROMPT_IDS)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert logits_close(ours, theirs, 1e-4)


def test_greedy_token_is_the_first_largest_logit():
    from flm.generate import greedy_token

    logits = torch.tensor([0.5, 2.0, -1.0, 2.0])
    assert greedy_token(logits) == int(torch.argmax(logits)) == 1
    with_nan = torch.tensor([0.5, float("nan"), 3.0])
    assert greedy_token(with_nan) == int(torch.argmax(with_nan)) == 1


def test_decode_step_bytes_count_a_tied_output_layer():
    """The embedding table is read one row per step, unless it is also the output layer."""
    from types import SimpleNamespace

    from flm.bench import decode_step_bytes

    def rec(name, n):
        return SimpleNamespace(name=name, data_nbytes=n)

    layers = [rec("model.layers.0.mlp.up_proj.weight", 100), rec("model.norm.weight", 4)]
    assert decode_step_bytes(layers + [rec("model.embed_tokens.weight", 50), rec("lm_head.weight", 50)]) == 154
    assert decode_step_bytes(layers + [rec("model.embed_tokens.weight", 50)]) == 154


def test_bench_command_reports_speed(tiny_flm, capsys):
    from flm.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["bench", str(tiny_flm), "--prompt", "16", "--gen", "4", "--no-bandwidth", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for label in ("prefill", "decode", "time to first token", "peak RSS", "weights read", "peak while loading"):
        assert label in out
    decode = float(next(line for line in out.splitlines() if line.startswith("decode")).split()[1])
    assert decode > 0
