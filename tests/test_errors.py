"""Errors users can act on: clear messages and non-zero exits, never tracebacks."""

from __future__ import annotations

import json
import shutil

import pytest

from spillover import LLM, SamplingParams
from spillover.cli.main import main
from spillover.errors import (
    ConfigError,
    ModelLoadError,
    PromptTooLongError,
    TokenizerMissingError,
    UnsupportedModelError,
)


def test_missing_path():
    with pytest.raises(ModelLoadError, match="not found"):
        LLM("/no/such/model.gguf")


def test_truncated_gguf(tmp_path, smollm2):
    bad = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        bad.write_bytes(f.read(20_000_000))
    with pytest.raises(ModelLoadError, match="truncated"):
        LLM(str(bad))


def test_garbage_gguf_header(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        LLM(str(bad))


def test_truncated_safetensors(tmp_path, tiny_models):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        LLM(str(d))


def test_corrupt_safetensors_header(tmp_path, tiny_models):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        LLM(str(d))


def test_unsupported_architecture(tmp_path, tiny_models):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_bigcode"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedModelError,
        match="supported: gemma3, gemma3_text, llama, mistral, mixtral, mllama, mllama_text_model, qwen2, qwen2_5_vl, qwen2_5_vl_text, qwen3, qwen3_moe",
    ):
        LLM(str(d))


def test_missing_tensor(tmp_path, tiny_models):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="up_proj"):
        LLM(str(d))


def test_no_tokenizer_text_prompt_is_clear(tiny_models):
    llm = LLM(str(tiny_models["llama"]), progress=False)
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=2)).token_ids  # token ids work
    with pytest.raises(TokenizerMissingError, match="token ids"):
        llm.generate("hello")


def test_prompt_longer_than_context(tiny_models):
    llm = LLM(str(tiny_models["llama"]), progress=False)
    with pytest.raises(PromptTooLongError, match="context is 256"):
        llm.generate(list(range(3, 303)), SamplingParams(max_tokens=2))


def test_refused_prompt_in_a_batch_leaves_nothing_behind(tiny_models):
    llm = LLM(str(tiny_models["llama"]), progress=False)
    with pytest.raises(PromptTooLongError):
        llm.generate([[5, 6, 7], list(range(3, 303))], SamplingParams(max_tokens=2))
    assert not llm.engine.has_work() and not llm.engine.requests
    assert llm.generate([5, 6, 7], SamplingParams(max_tokens=2)).finish_reason == "length"


def test_bad_sampling_params():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=-1)


def test_bad_token_ids(tiny_models):
    llm = LLM(str(tiny_models["llama"]), progress=False)
    with pytest.raises(ConfigError, match="token-id prompts"):
        llm.generate([5, 10_000])


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["run", "-m", "/no/such/dir", "-p", "hi"], 1, "model path not found"),
        (["run", "-n", "0:4;0:4", "-p", "hi"], 2, "0"),
        (["run", "-n", "abc", "-p", "hi"], 2, "abc"),
        (["run", "--max-seq-len", "0", "-p", "hi"], 2, "max_seq_len"),
        (["run", "--max-memory", "cpu=lots", "-p", "hi"], 2, "lots"),
    ],
)
def test_cli_errors_exit_nonzero_without_traceback(capsys, argv, code, message):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err
