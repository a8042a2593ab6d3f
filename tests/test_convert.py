"""Conversion from checkpoint folders and in-memory models, and its error paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import edit_config, save_checkpoint, tiny_llama
from flm.convert import ConvertOptions, convert
from flm.errors import CheckpointError, ConfigError, UnknownFamilyError, UnsupportedDtypeError
from flm.format.flm import read_flm
from flm.quant import DType, dequantize

ROOT = Path(__file__).resolve().parents[1]


def _read_back(flm, name):
    rec = flm.tensors[name]
    if rec.quantized:
        return dequantize(flm.quantized(rec), rec.dims)
    return flm.float_tensor(rec).to(torch.float32)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_layouts_convert_exactly(tmp_path, tiny_model, layout):
    src = save_checkpoint(tiny_model, tmp_path / layout, layout)
    convert(src, tmp_path / "m.flm", ConvertOptions(dtype="float32", progress=False))
    flm = read_flm(tmp_path / "m.flm")
    state = tiny_model.state_dict()
    assert set(flm.tensors) == set(state)
    for name, tensor in state.items():
        assert torch.equal(_read_back(flm, name), tensor), name


@pytest.mark.parametrize("dtype,code,tolerance", [
    ("float16", DType.FLOAT16, 0.0), ("bfloat16", DType.BFLOAT16, 0.0), ("int8", DType.INT8, 2 / 255),
    ("int4", DType.INT4_NOZERO, 1 / 15), ("int4g", DType.INT4_GROUP, 1 / 15),
])
def test_dtypes(tmp_path, tiny_dir, tiny_model, dtype, code, tolerance):
    convert(tiny_dir, tmp_path / "m.flm", ConvertOptions(dtype=dtype, group_size=32, progress=False))
    flm = read_flm(tmp_path / "m.flm")
    for name, tensor in tiny_model.state_dict().items():
        rec = flm.tensors[name]
        linear = name.endswith("_proj.weight") or name == "lm_head.weight"
        assert rec.dtype == (code if linear else DType.FLOAT32), name  # fastllm: only linear weights change
        back = _read_back(flm, name)
        if tolerance == 0:
            expected = tensor.to({"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]).float() if linear else tensor
            assert torch.equal(back, expected), name
        else:
            span = tensor.abs().amax(dim=-1, keepdim=True) * 2
            assert ((back - tensor).abs() <= span * tolerance * 1.0001 + 1e-7).all(), name


def test_fp16_source_and_tied_embeddings(tmp_path):
    model = tiny_llama(seed=3, tie_word_embeddings=True)
    src = save_checkpoint(model, tmp_path / "tied", dtype=torch.float16)
    convert(src, tmp_path / "t.flm", ConvertOptions(dtype="float16", progress=False))
    flm = read_flm(tmp_path / "t.flm")
    emb = flm.float_tensor(flm.tensors["model.embed_tokens.weight"])
    head = flm.float_tensor(flm.tensors["lm_head.weight"])
    assert emb.dtype == torch.float32 and head.dtype == torch.float16
    assert torch.equal(emb.half(), head)  # fastllm's files carry lm_head even when tied


def test_kv_holds_config_template_and_tokenizer(tmp_path, tiny_dir):
    convert(tiny_dir, tmp_path / "m.flm", ConvertOptions(dtype="float16", template="llama2-chat", progress=False))
    kv = read_flm(tmp_path / "m.flm").kv
    assert kv["model_type"] == "llama" and kv["num_key_value_heads"] == "2" and kv["hidden_size"] == "64"
    assert kv["user_role"] == "[INST] " and kv["bot_role"] == " [/INST]"
    assert kv["pre_prompt"] == "<FLM_FIX_TOKEN_1>"
    assert kv["tokenizer_add_dummy_prefix"] == "True"
    assert json.loads(kv["flm.tokenizer_json"])["model"]["type"] == "BPE"
    assert list(kv) == sorted(kv)


def test_sentencepiece_model_alone(tmp_path, tiny_dir):
    """A checkpoint whose tokenizer is tokenizer.model alone (InternLM2, Yi): fastllm's vocab table,
    the model's normalizer switches as keys, and a runtime tokenizer that agrees with sentencepiece."""
    import shutil

    import sentencepiece

    from flm import llm
    from sentencepiece_proto import encode_model, llama2_pieces

    src = tmp_path / "sp-only"
    shutil.copytree(tiny_dir, src)
    (src / "tokenizer.json").unlink()
    blob = encode_model(llama2_pieces(), add_dummy_prefix=False)
    (src / "tokenizer.model").write_bytes(blob)
    convert(src, tmp_path / "m.flm", ConvertOptions(dtype="float16", progress=False))
    flm = read_flm(tmp_path / "m.flm")
    assert flm.kv["tokenizer_add_dummy_prefix"] == "False" and "flm.tokenizer_json" not in flm.kv
    assert flm.kv["tokenizer_has_special_tokens"] == "1" and "</s>" in flm.special_tokens
    m = llm.model(tmp_path / "m.flm")
    text = "Hello world, how are you?\n  def f(x): return x  # 你好"
    assert m.tokenizer_encode_string(text) == sentencepiece.SentencePieceProcessor(model_proto=blob).encode(text)


def test_cookbook_config_keys(tmp_path, tiny_model):
    """方案二: model_type, the four strings and rope overrides written into config.json."""
    src = save_checkpoint(tiny_model, tmp_path / "plan2")
    edit_config(src, model_type="my_llama", architectures=["MyLlamaForCausalLM"], pre_prompt="SYS ", user_role="U: ", bot_role=" A:", history_sep="\n",
                tokenizer_add_dummy_prefix=False, rope_theta=500000, **{"rope_scaling.type": "dynamic",
                                                                           "rope_scaling.factor": 2.0})
    with pytest.raises(UnknownFamilyError, match="--model-type llama"):
        convert(src, tmp_path / "x.flm", ConvertOptions(progress=False))
    edit_config(src, model_type="llama")  # the cookbook's fix
    cfg = convert(src, tmp_path / "m.flm", ConvertOptions(progress=False))
    kv = read_flm(tmp_path / "m.flm").kv
    assert (kv["pre_prompt"], kv["user_role"], kv["bot_role"], kv["history_sep"]) == ("SYS ", "U: ", " A:", "\n")
    assert kv["tokenizer_add_dummy_prefix"] == "False"
    assert cfg.rope_theta == 500000 and cfg.rope_scaling.kind == "dynamic" and cfg.rope_scaling.factor == 2.0
    assert kv["rope_scaling.type"] == "dynamic" and kv["rope_scaling.factor"] == "2.0"


def test_cli_options_override(tmp_path, tiny_dir):
    from flm.cli import main

    assert main(["convert", str(tiny_dir), "-o", str(tmp_path / "c.flm"), "--dtype", "int8", "--user-role", "Q:",
                 "--model-type", "llama", "-q"]) == 0
    assert read_flm(tmp_path / "c.flm").kv["user_role"] == "Q:"


def test_tofile_plan1_on_transformers_5(tmp_path, tiny_model, llama2_tokenizer):
    """方案一 as the cookbook writes it, through the fastllm_pytools shim."""
    from fastllm_pytools import torch2flm

    conf = tiny_model.config.__dict__
    conf["model_type"] = "llama"
    conf["rope_scaling.type"] = "linear"
    conf["rope_scaling.factor"] = 4.0
    try:
        torch2flm.tofile(str(tmp_path / "p1.flm"), tiny_model, llama2_tokenizer, pre_prompt="<FLM_FIX_TOKEN_1>",
                         user_role="[INST] ", bot_role=" [/INST]", history_sep=" <FLM_FIX_TOKEN_2><FLM_FIX_TOKEN_1>",
                         dtype="int4")
    finally:
        del conf["rope_scaling.type"], conf["rope_scaling.factor"]
    flm = read_flm(tmp_path / "p1.flm")
    assert flm.kv["rope_scaling.type"] == "linear" and flm.kv["user_role"] == "[INST] "
    assert flm.tensors["model.layers.0.mlp.up_proj.weight"].dtype == DType.INT4_NOZERO
    assert len(flm.vocab) == 32000 and flm.vocab[0].piece == b"<unk>"


def test_llamalike2flm_script(tmp_path, tiny_dir):
    out = tmp_path / "s.flm"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "llamalike2flm.py"), str(out), "int4", str(tiny_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_flm(out).tensors["lm_head.weight"].dtype == DType.INT4_NOZERO


def test_vocab_scores_follow_fastllm(tmp_path, tiny_dir):
    convert(tiny_dir, tmp_path / "m.flm", ConvertOptions(progress=False))
    flm = read_flm(tmp_path / "m.flm")
    merges = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["merges"]
    first = "".join(merges[0]) if isinstance(merges[0], list) else merges[0].replace(" ", "")
    by_piece = {e.piece.decode(): e.score for e in flm.vocab}
    assert by_piece[first] == 0.0  # first merge -> score 0, later merges negative
    assert by_piece["<0x41>"] == 1.0  # not made by a merge -> 1.0
    assert flm.special_tokens == ["<unk>", "<s>", "</s>"]


# ---------------------------------------------------------------- bad input

def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "x.flm")


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        convert(tmp_path / "missing", tmp_path / "x.flm")


def test_unknown_architecture(tmp_path, tiny_model):
    src = save_checkpoint(tiny_model, tmp_path / "arch")
    edit_config(src, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnknownFamilyError, match="unknown model_type 'gpt2'"):
        convert(src, tmp_path / "x.flm")


def test_bad_dtype(tmp_path, tiny_dir):
    with pytest.raises(UnsupportedDtypeError, match="unknown dtype 'int3'"):
        convert(tiny_dir, tmp_path / "x.flm", ConvertOptions(dtype="int3"))


def test_shape_disagrees_with_config(tmp_path, tiny_model):
    src = save_checkpoint(tiny_model, tmp_path / "shape")
    edit_config(src, intermediate_size=96)
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight.*shape"):
        convert(src, tmp_path / "x.flm")
    assert not (tmp_path / "x.flm").exists()


def test_bad_config_values(tmp_path, tiny_model):
    src = save_checkpoint(tiny_model, tmp_path / "cfg")
    edit_config(src, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        convert(src, tmp_path / "x.flm")


def test_no_weights(tmp_path, tiny_model):
    src = save_checkpoint(tiny_model, tmp_path / "noweights")
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        convert(src, tmp_path / "x.flm")


def test_corrupt_safetensors(tmp_path, tiny_model):
    src = save_checkpoint(tiny_model, tmp_path / "corrupt")
    blob = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="outside the file"):
        convert(src, tmp_path / "x.flm")


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    from flm.cli import main

    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "x.flm")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_int4g_group_fallback_is_logged(tmp_path, caplog):
    model = tiny_llama(seed=4, hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
    src = save_checkpoint(model, tmp_path / "g")
    with caplog.at_level("WARNING", logger="flm"):
        convert(src, tmp_path / "g.flm", ConvertOptions(dtype="int4g", group_size=64, progress=False))
    assert "group size 64 does not divide row length 96; using 32" in caplog.text
    assert read_flm(tmp_path / "g.flm").tensors["model.layers.0.self_attn.q_proj.weight"].group_cnt == 32
