"""Well-formed but wrong model files: every case is refused with `error: ...` and a non-zero exit, before
any weight is read or any memory is planned (loading/validate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spillover.cli.main import main

H, HEADS, KV, HD, FF, V, L = 64, 4, 2, 16, 128, 320, 2


def _tensors(gguf: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"embed": (V, H), "norm": (H,), "q": (HEADS * HD, H), "k": (KV * HD, H), "v": (KV * HD, H),
              "o": (H, HEADS * HD), "gate": (FF, H), "up": (FF, H), "down": (H, FF)}  # fmt: skip
    g_names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down"}  # fmt: skip
    hf_names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip

    def arr(key: str) -> np.ndarray:
        return rng.standard_normal(shapes[key]).astype(np.float32) * 0.02

    out = {("token_embd.weight" if gguf else "model.embed_tokens.weight"): arr("embed"),
           ("output_norm.weight" if gguf else "model.norm.weight"): np.ones(H, np.float32)}  # fmt: skip
    for i in range(L):
        for norm_g, norm_h in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            out[f"blk.{i}.{norm_g}.weight" if gguf else f"model.layers.{i}.{norm_h}.weight"] = np.ones(
                H, np.float32
            )
        for k in g_names:
            out[f"blk.{i}.{g_names[k]}.weight" if gguf else f"model.layers.{i}.{hf_names[k]}.weight"] = arr(k)
    return out


GOOD_GGUF = {
    "block_count": ("uint32", L), "embedding_length": ("uint32", H), "feed_forward_length": ("uint32", FF),
    "attention.head_count": ("uint32", HEADS), "attention.head_count_kv": ("uint32", KV),
    "context_length": ("uint32", 256), "rope.freq_base": ("float32", 10000.0),
    "attention.layer_norm_rms_epsilon": ("float32", 1e-5),
}  # fmt: skip


def write_gguf(path, **override) -> str:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, (kind, value) in {**GOOD_GGUF, **override}.items():
        getattr(w, f"add_{kind}")(f"llama.{key}", value)
    for name, t in _tensors(gguf=True).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


GOOD_CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=V, hidden_size=H,
                   intermediate_size=FF, num_hidden_layers=L, num_attention_heads=HEADS, num_key_value_heads=KV,
                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)  # fmt: skip


def write_hf(d, config) -> str:
    from safetensors.numpy import save_file

    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    save_file(_tensors(gguf=False), str(d / "model.safetensors"))
    return str(d)


BAD_GGUF = {
    "head_count 0": {"attention.head_count": ("uint32", 0)},
    "head_count 7": {"attention.head_count": ("uint32", 7)},
    "head_count_kv 0": {"attention.head_count_kv": ("uint32", 0)},
    "head_count_kv 5": {"attention.head_count_kv": ("uint32", 5)},
    "embedding_length 0": {"embedding_length": ("uint32", 0)},
    "block_count 0": {"block_count": ("uint32", 0)},
    "block_count 2^31": {"block_count": ("uint32", 2**31)},
    "rope.freq_base 0": {"rope.freq_base": ("float32", 0.0)},
    "rms_epsilon -1": {"attention.layer_norm_rms_epsilon": ("float32", -1.0)},
}
BAD_CONFIG = {
    "hidden_size null": {**GOOD_CONFIG, "hidden_size": None},
    "a list": [GOOD_CONFIG],
    "vocab_size -1": {**GOOD_CONFIG, "vocab_size": -1},
    "num_hidden_layers 0": {**GOOD_CONFIG, "num_hidden_layers": 0},
    "num_attention_heads 7": {**GOOD_CONFIG, "num_attention_heads": 7},
    "num_key_value_heads 0": {**GOOD_CONFIG, "num_key_value_heads": 0},
    "rope_theta 0": {**GOOD_CONFIG, "rope_theta": 0},
    "rms_norm_eps -1": {**GOOD_CONFIG, "rms_norm_eps": -1},
}


def _refused(capsys, path: str) -> str:
    code = main(["plan", "-m", path, "--cpu", "4GiB"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err


def test_good_files_plan(tmp_path, capsys):
    assert main(["plan", "-m", write_gguf(tmp_path / "ok.gguf"), "--cpu", "4GiB"]) == 0
    assert main(["plan", "-m", write_hf(tmp_path / "ok", GOOD_CONFIG), "--cpu", "4GiB"]) == 0


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_bad_gguf_metadata_is_refused(tmp_path, capsys, case):
    _refused(capsys, write_gguf(tmp_path / "bad.gguf", **BAD_GGUF[case]))


@pytest.mark.parametrize("case", list(BAD_CONFIG))
def test_bad_config_json_is_refused(tmp_path, capsys, case):
    _refused(capsys, write_hf(tmp_path / "bad", BAD_CONFIG[case]))


def test_block_count_zero_does_not_load(tmp_path):
    from spillover import LLM
    from spillover.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="block_count"):
        LLM(write_gguf(tmp_path / "zero.gguf", block_count=("uint32", 0)), progress=False)
