"""Conformance per family: a tiny random checkpoint in the family's own layout and config keys,
converted with `flm convert`, against a transformers reference on the same weights."""

import copy
import json
import shutil

import pytest
import torch

from helpers import logits_close
from helpers import LLAMA2_TOKENIZER, TINY, tiny_llama
from flm import llm
from flm.cli import main as cli
from flm.convert import ConvertOptions, convert
from flm.errors import CheckpointError
from flm.format.flm import read_flm

IDS = [1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 3492, 526, 263, 1243]


def _logits_flm(path, ids=IDS):
    m = llm.model(path)
    return m.backend.score(ids)


def _logits_hf(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _greedy_flm(path, n=32):
    m = llm.model(path)
    m.eos_ids = set()
    return list(m.generate_ids(IDS, llm.SamplingConfig(max_length=n)))


def _greedy_hf(model, n=32):
    with torch.no_grad():
        out = model.generate(torch.tensor([IDS]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(IDS):].tolist()


def _half_weights(model):
    """The reference for a float16 file: linear weights rounded to float16, as the file stores them."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.half().float())
    return ref


def _check_family(src, reference, tmp_path):
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.flm"
        assert cli(["convert", str(src), "-o", str(out), "--dtype", dtype, "-q"]) == 0
        ref = reference if dtype == "float32" else _half_weights(reference)
        ours, theirs = _logits_flm(out), _logits_hf(ref)
        assert logits_close(ours, theirs, 1e-4), dtype
        assert _greedy_flm(out) == _greedy_hf(ref), dtype


def _copy_tokenizer(directory):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(LLAMA2_TOKENIZER / name, directory / name)


def _save_state(directory, config, state):
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    _copy_tokenizer(directory)


def test_mistral_with_sliding_window(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    config = MistralConfig(**{**TINY, "sliding_window": 8})
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "mistral")
    _copy_tokenizer(tmp_path / "mistral")
    _check_family(tmp_path / "mistral", model, tmp_path)


def test_qwen2_qkv_bias(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    model.save_pretrained(tmp_path / "qwen2")
    _copy_tokenizer(tmp_path / "qwen2")
    assert _kv_after_convert(tmp_path / "qwen2", tmp_path)["model_type"] == "qwen2"
    _check_family(tmp_path / "qwen2", model, tmp_path)


def _kv_after_convert(src, tmp_path):
    convert(src, tmp_path / "kv.flm", ConvertOptions(dtype="float32", progress=False))
    return read_flm(tmp_path / "kv.flm").kv


def test_internlm_v1_layout(tmp_path):
    """InternLM: LLaMA names, biases on q/k/v/o, RoPE under `rotary`."""
    config = {"architectures": ["InternLMForCausalLM"], "model_type": "internlm", "bias": True,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
              "rms_norm_eps": 1e-5, "vocab_size": 32000, "max_position_embeddings": 256, "bos_token_id": 1,
              "eos_token_id": 2, "rotary": {"base": 10000, "type": "dynamic", "scaling_factor": 1.0},
              "tie_word_embeddings": False}
    reference = tiny_llama(seed=6, attention_bias=True, num_key_value_heads=4)  # v1 has no GQA key
    _save_state(tmp_path / "internlm", config, reference.state_dict())
    _check_family(tmp_path / "internlm", reference, tmp_path)
    kv = _kv_after_convert(tmp_path / "internlm", tmp_path)
    assert kv["flm.template"] == "internlm" and "103028" not in kv["eos_token_id"]  # vocab too small for <eoa>


def _pack_internlm2(state, layers, heads, kv_heads, head_dim):
    """The test's own InternLM2 packing: per KV group, its query heads, then k, then v."""
    per_group = heads // kv_heads
    out = {"model.tok_embeddings.weight": state["model.embed_tokens.weight"], "model.norm.weight": state["model.norm.weight"],
           "output.weight": state["lm_head.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        q, k, v = (state[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        rows = []
        for g in range(kv_heads):
            for h in range(per_group):
                head = g * per_group + h
                rows.append(q[head * head_dim:(head + 1) * head_dim])
            rows.append(k[g * head_dim:(g + 1) * head_dim])
            rows.append(v[g * head_dim:(g + 1) * head_dim])
        out[p + "attention.wqkv.weight"] = torch.cat(rows)
        out[p + "attention.wo.weight"] = state[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = state[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = state[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = state[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = state[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
    return out


def test_internlm2_packed_wqkv(tmp_path):
    reference = tiny_llama(seed=7, num_attention_heads=8, num_key_value_heads=2, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}, max_position_embeddings=12)
    config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
              "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
              "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "vocab_size": 32000, "max_position_embeddings": 12,
              "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bos_token_id": 1,
              "eos_token_id": 2, "tie_word_embeddings": False}
    _save_state(tmp_path / "internlm2", config, _pack_internlm2(reference.state_dict(), 2, 8, 2, 8))
    # positions run past max_position_embeddings (12): dynamic NTK must follow transformers
    for dtype in ("float32", "float16"):
        out = tmp_path / f"{dtype}.flm"
        assert cli(["convert", str(tmp_path / "internlm2"), "-o", str(out), "--dtype", dtype, "-q"]) == 0
        ref = reference if dtype == "float32" else _half_weights(reference)
        m = llm.model(out)
        ours = m.backend.score(IDS)
        theirs = _logits_hf(ref)
        assert logits_close(ours, theirs, 1e-4), dtype


INTERNLM2_CONFIG = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False, "hidden_size": 64,
    "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "rms_norm_eps": 1e-5, "vocab_size": 32000, "max_position_embeddings": 12, "rope_theta": 1000000,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False}


def _fastllm_written(path, state, dtype):
    """A .flm laid out as fastllm's llamalike2flm writes InternLM2 (torch2flm: the state_dict's
    own names, str() of each config value with rope_scaling flattened, fastllm's payloads)."""
    from fastllm_layout import flm_file, tensor_record
    from flm.tokenization.tokenizer import fastllm_vocab_from_tokenizer_json, load_tokenizer_json

    kv = {k: str(v) for k, v in INTERNLM2_CONFIG.items() if k != "rope_scaling"}
    kv.update({"rope_scaling.type": "dynamic", "rope_scaling.factor": "2.0", "tokenizer_use_score": "1"})
    vocab = fastllm_vocab_from_tokenizer_json(load_tokenizer_json((LLAMA2_TOKENIZER / "tokenizer.json").read_text()))
    records = []
    for name, t in state.items():
        linear = t.dim() == 2 and "tok_embeddings" not in name and "embed_tokens" not in name
        records.append(tensor_record(name, t.float().numpy(), dtype if linear else "float32", group_cnt=32))
    path.write_bytes(flm_file(kv, [(e.piece, e.token_id, e.score) for e in vocab.entries], records))
    return path


@pytest.mark.parametrize("dtype", ["float16", "int8", "int4", "int4g"])
def test_fastllm_written_internlm2_file(tmp_path, dtype):
    """fastllm's converter keeps InternLM2's names and packed wqkv: loading such a file splits
    wqkv into q/k/v rows in the stored dtype, giving exactly the model that a file with LLaMA
    names and separate q/k/v of the same weights gives (and transformers' logits for float16)."""
    reference = tiny_llama(seed=7, num_attention_heads=8, num_key_value_heads=2, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}, max_position_embeddings=12)
    state = reference.state_dict()
    packed = _fastllm_written(tmp_path / "internlm2.flm", _pack_internlm2(state, 2, 8, 2, 8), dtype)
    plain = _fastllm_written(tmp_path / "plain.flm", state, dtype)
    assert "model.layers.0.attention.wqkv.weight" in read_flm(packed).tensors
    ours = _logits_flm(packed)
    assert torch.equal(ours, _logits_flm(plain))
    if dtype == "float16":
        assert logits_close(ours, _logits_hf(_half_weights(reference)), 1e-4)
    m = llm.model(packed)
    assert m.model_type == "internlm2" and m.config.rope_scaling.kind == "dynamic"
    m.save(tmp_path / "saved.flm")  # written back with canonical names, q/k/v apart
    saved = read_flm(tmp_path / "saved.flm").tensors
    assert "model.layers.1.self_attn.k_proj.weight" in saved and "output.weight" not in saved
    assert torch.equal(_logits_flm(tmp_path / "saved.flm"), ours)


def test_fastllm_written_internlm2_file_with_wrong_wqkv(tmp_path):
    from flm.errors import FlmFormatError

    reference = tiny_llama(seed=7, num_attention_heads=8, num_key_value_heads=2)
    packed = _pack_internlm2(reference.state_dict(), 2, 8, 2, 8)
    packed["model.layers.1.attention.wqkv.weight"] = packed["model.layers.1.attention.wqkv.weight"][:-8]
    path = _fastllm_written(tmp_path / "bad.flm", packed, "float16")
    with pytest.raises(FlmFormatError, match=r"wqkv.weight has shape \[88, 64\]; the config implies 96 rows \(q_proj, k_proj, v_proj\)"):
        llm.model(path)


@pytest.mark.parametrize("packing,dtype", [("mergeqkv", "int8"), ("mergeqkv", "int4g"), ("W_pack", "float16")])
def test_fastllm_concatenated_qkv_and_gateup(tmp_path, packing, dtype):
    """fastllm's C++ side concatenates q/k/v (`self_attn.mergeqkv`, Baichuan's `W_pack`, with the
    biases) and gate/up (`mlp.gateup_proj`) row-wise and saves them so: read back as the model
    the separate tensors give, bit for bit."""
    from fastllm_layout import flm_file, tensor_record, torch2flm_kv

    reference = tiny_llama(seed=11, attention_bias=True, num_key_value_heads=2)
    state = {k: v.float() for k, v in reference.state_dict().items()}
    merged = dict(state)
    for i in range(2):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            merged[f"{p}self_attn.{packing}.{kind}"] = torch.cat(
                [merged.pop(f"{p}self_attn.{n}_proj.{kind}") for n in "qkv"])
        merged[p + "mlp.gateup_proj.weight"] = torch.cat([merged.pop(p + "mlp.gate_proj.weight"),
                                                          merged.pop(p + "mlp.up_proj.weight")])
    kv = {**torch2flm_kv(reference), "tokenizer_use_score": "1"}
    paths = {}
    for label, tensors in (("merged", merged), ("plain", state)):
        records = [tensor_record(n, t.numpy(), dtype if t.dim() == 2 and "embed" not in n else "float32", 32)
                   for n, t in tensors.items()]
        paths[label] = tmp_path / f"{label}.flm"
        paths[label].write_bytes(flm_file(kv, [(b"<unk>", 0, 0.0)], records))
    assert "model.layers.0.mlp.gateup_proj.weight" in read_flm(paths["merged"]).tensors
    assert torch.equal(_logits_flm(paths["merged"]), _logits_flm(paths["plain"]))


def test_yulan_style_delta_merge(tmp_path):
    base = tiny_llama(seed=8)
    finetuned = tiny_llama(seed=9, vocab_size=32008)
    base.save_pretrained(tmp_path / "base")
    _copy_tokenizer(tmp_path / "base")
    base_state = base.state_dict()
    delta = {}
    for name, tensor in finetuned.state_dict().items():
        d = tensor.clone()
        d[: base_state[name].shape[0]] -= base_state[name]
        delta[name] = d
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    cfg["vocab_size"] = 32008
    _save_state(tmp_path / "delta", cfg, delta)
    assert cli(["convert", str(tmp_path / "delta"), "--delta-base", str(tmp_path / "base"), "-o",
                str(tmp_path / "merged.flm"), "--dtype", "float32", "-q"]) == 0
    flm = read_flm(tmp_path / "merged.flm")
    for name, d in delta.items():
        expected = d.clone()
        expected[: base_state[name].shape[0]] += base_state[name]
        assert torch.equal(flm.float_tensor(flm.tensors[name]), expected), name


def test_delta_with_wrong_base(tmp_path):
    base = tiny_llama(seed=8, vocab_size=32016)
    base.save_pretrained(tmp_path / "base")
    small = tiny_llama(seed=9)
    small.save_pretrained(tmp_path / "delta")
    _copy_tokenizer(tmp_path / "delta")
    with pytest.raises(CheckpointError, match="vocab_size 32000 is smaller"):
        convert(tmp_path / "delta", tmp_path / "x.flm", delta_base=tmp_path / "base")


def test_verify_command(tmp_path, tiny_dir, capsys):
    convert(tiny_dir, tmp_path / "v.flm", ConvertOptions(dtype="float16", progress=False))
    assert cli(["verify", str(tiny_dir), str(tmp_path / "v.flm")]) == 0
    out = capsys.readouterr().out
    assert "verdict: MATCH" in out and "transformers LlamaForCausalLM" in out


def test_verify_detects_a_wrong_file(tmp_path, tiny_dir, capsys):
    other = tiny_llama(seed=11)
    other.save_pretrained(tmp_path / "other")
    _copy_tokenizer(tmp_path / "other")
    convert(tmp_path / "other", tmp_path / "o.flm", ConvertOptions(dtype="float32", progress=False))
    assert cli(["verify", str(tiny_dir), str(tmp_path / "o.flm")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_early_yi_layout_and_xverse_template(tmp_path):
    """Early Yi checkpoints name the layer norms ln1/ln2; XVERSE gets the cookbook's XVERSE strings."""
    reference = tiny_llama(seed=12)
    state = {k.replace("input_layernorm", "ln1").replace("post_attention_layernorm", "ln2"): v
             for k, v in reference.state_dict().items()}
    config = json.loads(json.dumps({**TINY, "model_type": "Yi", "architectures": ["YiForCausalLM"]}))
    _save_state(tmp_path / "yi", config, state)
    _check_family(tmp_path / "yi", reference, tmp_path)
    xverse = {**TINY, "model_type": "xverse", "architectures": ["XverseForCausalLM"]}
    _save_state(tmp_path / "xverse", xverse, reference.state_dict())
    assert _kv_after_convert(tmp_path / "xverse", tmp_path)["history_sep"] == "<FLM_FIX_TOKEN_3>"
