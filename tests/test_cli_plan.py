"""`spillover plan` end to end through spillover.cli.main.main, on hypothetical hardware."""

from __future__ import annotations

import json

import pytest

from spillover.cli.main import main

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
}  # fmt: skip


@pytest.fixture
def llama_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(tmp_path)


def run_json(capsys, *argv):
    rc = main(["plan", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_table_for_offload(capsys, llama_dir):
    rc = main(["plan", "-m", llama_dir, "--gpu", "12GiB", "--cpu", "64GiB"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("device", "layers", "weights", "KV cache", "activations", "other", "capacity", "headroom"):
        assert word in out
    assert "cuda:0" in out and "cpu" in out and "verdict: fits with offload" in out
    assert "sizes computed from config.json" in out


def test_json_schema(capsys, llama_dir):
    rc, doc = run_json(capsys, "-m", llama_dir, "--gpu", "24GiB", "--gpu", "8GiB", "--cpu", "64GiB",
                       "--max-seq-len", "32768", "--max-batch-size", "2")  # fmt: skip
    assert rc == 0 and doc["fits"] is True and doc["num_layers"] == 32
    assert doc["params"] == {"max_seq_len": 32768, "max_batch_size": 2, "max_num_images": 1,
                             "max_image_length": 1024, "paged_attention": True, "isq": None, "dtype": "bf16"}  # fmt: skip
    assert [d["device"] for d in doc["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    placed = sorted(i for d in doc["devices"] for i in d["layers"])
    assert placed == list(range(32))
    for d in doc["devices"]:
        for key in ("capacity_bytes", "weight_bytes", "kv_cache_bytes", "activation_bytes", "other_bytes"):
            assert isinstance(d[key], int)


def test_fits_on_gpu_json(capsys, llama_dir):
    rc, doc = run_json(capsys, "-m", llama_dir, "--gpu", "80GiB", "--cpu", "64GiB")
    assert rc == 0 and doc["devices"][0]["layers"] == list(range(32))
    assert doc["device_map"]["embed"] == doc["device_map"]["head"] == "cuda:0"


def test_does_not_fit_exits_nonzero_with_shortfall_and_hints(capsys, llama_dir):
    rc = main(["plan", "-m", llama_dir, "--gpu", "8GiB", "--cpu", "8GiB"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "does not fit" in captured.out
    assert "short by" in captured.err and "GiB" in captured.err and "--isq 4" in captured.err


def test_does_not_fit_json(capsys, llama_dir):
    rc, doc = run_json(capsys, "-m", llama_dir, "--gpu", "8GiB", "--cpu", "8GiB")
    assert rc == 1 and doc["fits"] is False and doc["hints"]


def test_isq_and_max_memory(capsys, llama_dir):
    _, plain = run_json(
        capsys, "-m", llama_dir, "--gpu", "24GiB", "--cpu", "64GiB", "--max-memory", "cuda:0=8GiB"
    )
    _, q4 = run_json(capsys, "-m", llama_dir, "--gpu", "24GiB", "--cpu", "64GiB", "--max-memory", "cuda:0=8GiB",
                     "--isq", "4")  # fmt: skip
    assert plain["devices"][0]["capacity_bytes"] < 8 << 30
    assert q4["params"]["isq"] == 4
    assert len(q4["devices"][0]["layers"]) > len(plain["devices"][0]["layers"])


def test_unified(capsys, llama_dir):
    rc, doc = run_json(capsys, "-m", llama_dir, "--unified", "--cpu", "32GiB")
    assert rc == 0
    gpu, cpu = doc["devices"]
    assert gpu["budget_bytes"] == 24 << 30 and cpu["budget_bytes"] == 8 << 30


def test_manual_map(capsys, llama_dir):
    rc, doc = run_json(capsys, "-m", llama_dir, "--gpu", "24GiB", "--cpu", "64GiB", "-n", "0:10")
    assert rc == 0 and doc["manual"] and doc["devices"][0]["layers"] == list(range(10))


def test_bad_manual_map_is_a_clear_error(capsys, llama_dir):
    rc = main(["plan", "-m", llama_dir, "--gpu", "24GiB", "-n", "0:10;1:4"])
    err = capsys.readouterr().err
    assert rc == 2 and "GPU 1" in err and "only 1 GPU(s) are visible" in err and "Traceback" not in err


def test_bad_size_is_a_clear_error(capsys, llama_dir):
    rc = main(["plan", "-m", llama_dir, "--gpu", "lots"])
    assert rc == 2 and "cannot read the memory size 'lots'" in capsys.readouterr().err


def test_default_model_is_smollm2(capsys, smollm2):
    rc, doc = run_json(capsys, "--gpu", "8GiB", "--cpu", "16GiB")
    assert rc == 0 and doc["num_layers"] == 30 and doc["devices"][0]["layers"] == list(range(30))
    # Q4_1 projections kept int4 on the GPU (0.625 bytes a weight, not bf16's 2), the tied Q8_0 embedding
    # int8 (30 MiB, not bf16's 54): about the file's 93 MB
    assert 85 << 20 < doc["devices"][0]["weight_bytes"] < 100 << 20


def test_plan_hub_id_reads_only_config_and_headers(monkeypatch, tmp_path, capsys):
    """A hub id is planned from config.json and the safetensors headers; no weights are downloaded."""
    import json

    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shapes = {
        "model.embed_tokens.weight": [1000, 64],
        "model.norm.weight": [64],
        "lm_head.weight": [1000, 64],
    }
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [64, 64], p + "self_attn.k_proj.weight": [32, 64],
                   p + "self_attn.v_proj.weight": [32, 64], p + "self_attn.o_proj.weight": [64, 64],
                   p + "mlp.gate_proj.weight": [128, 64], p + "mlp.up_proj.weight": [128, 64],
                   p + "mlp.down_proj.weight": [64, 128], p + "input_layernorm.weight": [64],
                   p + "post_attention_layernorm.weight": [64]}  # fmt: skip
    tensors, off = {}, 0
    for k, shape in shapes.items():
        n = 2 * (shape[0] * (shape[1] if len(shape) > 1 else 1))
        tensors[k] = TensorInfo(dtype="BF16", shape=shape, data_offsets=(off, off + n))
        off += n
    files = {"model.safetensors": SafetensorsFileMetadata(metadata={}, tensors=tensors)}
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append(filename)
        assert filename == "config.json"
        return str(tmp_path / "config.json")

    def no_snapshot(*a, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_snapshot)
    monkeypatch.setattr("spillover.cli.common.hub_reachable", lambda *a, **kw: (True, "a test's hub"))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata",
                        lambda repo_id, **kw: SafetensorsRepoMetadata(metadata=None, sharded=False,
                                                                      weight_map={k: "model.safetensors" for k in tensors},
                                                                      files_metadata=files))  # fmt: skip
    assert main(["plan", "-m", "someone/tiny-llama", "--gpu", "1GiB", "--cpu", "4GiB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_layers"] == 2 and out["fits"]
    assert calls == ["config.json"]


def test_plan_imports_no_torch(tmp_path, smollm2, gemma3):
    """Start-up (issue 14): `spillover plan` reads headers, probes this machine and plans without importing torch
    (1.4 s of a 1.7 s plan), for GGUFs and for directories that hold only config.json, of every kind of
    architecture (dense, vision, cross-attention, experts). Each plan is checked to have run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_mllama import LLAMA_32_11B_VISION
    from test_vision import QWEN25_VL_7B

    moe = json.loads((Path(__file__).parent / "configs" / "qwen3-30b-a3b" / "config.json").read_text())
    models = {smollm2: 30, gemma3: 18}
    for name, cfg in (
        ("llama", LLAMA3_8B),
        ("vl", QWEN25_VL_7B),
        ("mllama", LLAMA_32_11B_VISION),
        ("moe", moe),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        models[str(tmp_path / name)] = (cfg.get("text_config") or cfg)["num_hidden_layers"]
    from spillover.placement.inventory import gpu_driver_installed

    # this machine's inventory (the probe too); where a GPU driver is installed probing asks torch: a made-up one
    machine = ["--gpu", "24GiB", "--cpu", "64GiB"] if gpu_driver_installed() else []
    heavy = ("torch", "transformers", "triton", "spillover.models.base")
    code = (
        "import contextlib, io, json, sys\nfrom spillover.cli.main import main\n"
        "for m in sys.argv[1:]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        f"        rc = main(['plan', '-m', m, '--json', *{machine!r}])\n"
        f"    print(json.dumps([rc, json.loads(out.getvalue())['num_layers'], [x for x in {heavy!r} if x in sys.modules]]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", code, *models], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(rc in (0, 1), layers) for rc, layers, _ in results] == [(True, n) for n in models.values()]
    assert [imported for _, _, imported in results] == [[]] * len(models)
