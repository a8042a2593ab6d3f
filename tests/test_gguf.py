"""`flm convert model.gguf`: weights, config and tokenizer from llama.cpp's format."""

import gguf
import numpy as np
import pytest
import torch

from helpers import LLAMA2_TOKENIZER
from corpus import corpus_lines
from flm import llm
from flm.convert import ConvertOptions, convert
from flm.errors import CheckpointError
from flm.format.flm import read_flm
from sentencepiece_proto import llama2_pieces


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf interleaving of q/k rows (LlamaModel.permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_gguf(path, model, arch="llama", rope_freqs=False, flat_scores=False):
    """A GGUF file laid out as llama.cpp's converter writes a LLaMA: its tensor names, permuted
    q/k, float32 weights, and Llama-2's SentencePiece vocabulary."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(100000.0)
    writer.add_tokenizer_model("llama")
    pieces = llama2_pieces()
    writer.add_token_list([p[0] for p in pieces])
    writer.add_token_scores([-1000.0 if flat_scores else p[1] for p in pieces])
    writer.add_token_types([p[2] for p in pieces])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                data = _llama_cpp_permute(data, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                data = _llama_cpp_permute(data, cfg.num_key_value_heads)
            target = f"blk.{index}.{layer[module]}.weight"
        else:
            target = names[name]
        writer.add_tensor(target, data)
    if rope_freqs:
        writer.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_gguf_with_sentencepiece_vocab(tmp_path, tiny_model):
    """q/k rows put back in Hugging Face's order (logits equal transformers' on the original
    weights), the config from metadata, the SentencePiece vocabulary equal to Llama-2's tokenizer."""
    from tokenizers import Tokenizer as HF

    from helpers import tiny_llama

    reference = tiny_llama(rope_theta=100000.0)
    _write_gguf(tmp_path / "m.gguf", reference)
    convert(tmp_path / "m.gguf", tmp_path / "m.flm", ConvertOptions(dtype="float32", progress=False))
    m = llm.model(tmp_path / "m.flm")
    assert (m.config.rope_theta, m.config.num_key_value_heads) == (100000.0, reference.config.num_key_value_heads)
    ids = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889]
    ours = m.backend.score(ids)
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    lines = corpus_lines()[::7]
    hf = HF.from_file(str(LLAMA2_TOKENIZER / "tokenizer.json"))
    assert [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)] == m.tokenizer.encode_batch(lines)


def test_smollm2_gguf_equals_transformers_gguf_loading(tmp_path, smollm2_dir):
    """The real Q4_1 GGUF: every tensor bit for bit what transformers' GGUF loader made of it (the
    built-in checkpoint), the same ids on the corpus, and the answer."""
    from flm.builtin import smollm2_gguf

    convert(smollm2_gguf(), tmp_path / "g.flm", ConvertOptions(dtype="float32", progress=False))
    convert(smollm2_dir, tmp_path / "h.flm", ConvertOptions(dtype="float32", progress=False))
    ours, theirs = read_flm(tmp_path / "g.flm"), read_flm(tmp_path / "h.flm")
    assert set(ours.tensors) == set(theirs.tensors)
    for name, rec in ours.tensors.items():
        assert torch.equal(ours.float_tensor(rec), theirs.float_tensor(theirs.tensors[name])), name
    g, h = llm.model(tmp_path / "g.flm"), llm.model(tmp_path / "h.flm")
    lines = corpus_lines()[::3]
    assert g.tokenizer.encode_batch(lines) == h.tokenizer.encode_batch(lines)
    assert g.get_prompt("hi") == h.get_prompt("hi")
    assert "Paris" in g.response("What is the capital of France?", max_length=20)


@pytest.mark.parametrize("name", ["deepseek-coder", "deepseek-llm"])
def test_byte_level_gguf_vocab_gives_hugging_face_ids(name):
    """A GGUF byte-level vocabulary with its `pre` name (the llama.cpp test vocabularies of
    fixtures/tokenizers/ggml_vocab) against Hugging Face's ids for llama.cpp's test strings."""
    import gzip
    import json

    from helpers import FIXTURES
    from flm.tokenization.from_gguf import byte_level_tokenizer_json
    from flm.tokenization.tokenizer import Tokenizer

    with gzip.open(FIXTURES / "tokenizers" / "ggml_vocab" / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        fixture = json.load(f)
    ours = Tokenizer(byte_level_tokenizer_json(fixture["tokens"], fixture["types"], fixture["merges"], name))
    bad = [(text, ids) for text, ids in fixture["tests"] if ours.encode(text) != ids]
    assert not bad, bad[:3]


def test_gguf_without_piece_scores_warns(tmp_path, tiny_model, caplog):
    """llama.cpp writes one score for every piece when it converts from a tokenizer.json alone."""
    _write_gguf(tmp_path / "s.gguf", tiny_model, flat_scores=True)
    with caplog.at_level("WARNING", logger="flm"):
        convert(tmp_path / "s.gguf", tmp_path / "s.flm", ConvertOptions(dtype="float16", progress=False))
    assert "merge order is lost" in caplog.text


def test_gguf_errors(tmp_path, tiny_model):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF model"):
        convert(tmp_path / "x.gguf", tmp_path / "x.flm", ConvertOptions(progress=False))
    _write_gguf(tmp_path / "q.gguf", tiny_model, arch="qwen3")
    with pytest.raises(CheckpointError, match="architecture 'qwen3' is not supported"):
        convert(tmp_path / "q.gguf", tmp_path / "q.flm", ConvertOptions(progress=False))
    _write_gguf(tmp_path / "r.gguf", tiny_model, rope_freqs=True)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        convert(tmp_path / "r.gguf", tmp_path / "r.flm", ConvertOptions(progress=False))
    assert not (tmp_path / "r.flm").exists()
