"""Tensor parallelism without processes: the planning rule on hypothetical GPUs (real 8B / 70B configs), the
slices each rank takes, and sliced reads from real GGUF and safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_plan import LLAMA3_8B

from spillover.cli.main import main
from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.distributed.shard import Slice, param_slices, shard_spec
from spillover.distributed.slices import SliceReader
from spillover.errors import ConfigError
from spillover.placement.estimate import GiB, requirements
from spillover.placement.tensor_parallel import NCCL_RESERVE_BYTES, plan_tensor_parallel

CFG_8B = ModelConfig.from_hf(LLAMA3_8B)
CFG_70B = ModelConfig.from_hf({**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672,
                               "num_hidden_layers": 80, "num_attention_heads": 64})  # fmt: skip
PARAMS = AutoDeviceMapParams()  # 4096 tokens, batch 1


def llama_params(c: ModelConfig) -> int:
    """Parameters of a Llama, counted by hand: embeddings, head, and per layer q/k/v/o, the MLP, two norms."""
    H, kv = c.hidden_size, c.num_key_value_heads * c.head_dim
    layer = H * (H + 2 * kv) + H * H + 3 * H * c.intermediate_size + 2 * H
    return 2 * c.vocab_size * H + c.num_hidden_layers * layer + H


def gpus(n: int, gib: float) -> list[tuple[str, int, int]]:
    return [(f"cuda:{i}", int(gib * GiB), int(gib * GiB)) for i in range(n)]


def test_8b_over_two_80gib_gpus_each_holds_half():
    req = requirements(CFG_8B, PARAMS, "bf16")
    tp = plan_tensor_parallel(CFG_8B, req, gpus(2, 78.4))
    assert tp.size == 2 and len(tp.gpus) == 2
    g = tp.gpus[0]
    assert llama_params(CFG_8B) == pytest.approx(8.03e9, rel=0.01)
    assert g.weight_bytes == pytest.approx(llama_params(CFG_8B) * 2 / 2, rel=0.001)  # bf16, half each
    # K and V of 4096 tokens: 32 layers x 4 of the 8 kv heads x 128 x 2 bytes x 2
    assert g.kv_cache_bytes == 4096 * 32 * 4 * 128 * 2 * 2
    assert g.other_bytes >= NCCL_RESERVE_BYTES and g.fits


def test_70b_over_four_80gib_gpus_but_not_over_two_40gib():
    req = requirements(CFG_70B, PARAMS, "bf16")
    assert llama_params(CFG_70B) == pytest.approx(70.6e9, rel=0.01)
    four = plan_tensor_parallel(CFG_70B, req, gpus(4, 78.4))
    assert four.size == 4
    assert four.gpus[0].weight_bytes == pytest.approx(llama_params(CFG_70B) * 2 / 4, rel=0.001)  # 32.9 GiB
    assert four.gpus[0].kv_cache_bytes == 4096 * 80 * 2 * 128 * 2 * 2  # 2 of the 8 kv heads per GPU
    two = plan_tensor_parallel(CFG_70B, req, gpus(2, 40))
    assert two.size == 1 and "cuda:0 would need" in two.reason and "layer map" in two.reason
    with pytest.raises(ConfigError, match="--tensor-parallel-size 2"):
        plan_tensor_parallel(CFG_70B, req, gpus(2, 40), requested=2)


def test_fewer_kv_heads_than_gpus_replicates_them():
    cfg = CFG_8B.replace(num_key_value_heads=2)
    tp = plan_tensor_parallel(cfg, requirements(cfg, PARAMS, "bf16"), gpus(4, 78.4))
    assert tp.size == 4
    assert tp.gpus[0].kv_cache_bytes == 4096 * 32 * 1 * 128 * 2 * 2  # one (replicated) kv head each
    assert [shard_spec(cfg, r, 4).kv_first for r in range(4)] == [0, 0, 1, 1]


def test_off_switches_and_refusals():
    req = requirements(CFG_8B, PARAMS, "bf16")
    assert plan_tensor_parallel(CFG_8B, req, gpus(1, 80)).size == 1
    off = plan_tensor_parallel(CFG_8B, req, gpus(2, 80), environ={"SPILLOVER_NO_NCCL": "1"})
    assert off.size == 1 and "SPILLOVER_NO_NCCL=1" in off.reason
    assert plan_tensor_parallel(CFG_8B, req, gpus(3, 80)).size == 1  # 32 heads over 3: layer map, says why
    assert "do not divide over 3" in plan_tensor_parallel(CFG_8B, req, gpus(3, 80)).reason
    assert plan_tensor_parallel(CFG_8B, req, gpus(4, 80), requested=2).size == 2  # fewer ranks than GPUs
    with pytest.raises(ConfigError, match="do not divide over 3"):
        plan_tensor_parallel(CFG_8B, req, gpus(4, 80), requested=3)
    with pytest.raises(ConfigError, match="needs 4 CUDA GPUs but 2"):
        plan_tensor_parallel(CFG_8B, req, gpus(2, 80), requested=4)
    with pytest.raises(ConfigError, match="SPILLOVER_NO_NCCL"):
        plan_tensor_parallel(CFG_8B, req, gpus(2, 80), requested=2, environ={"SPILLOVER_NO_NCCL": "1"})


def test_cli_plan_shows_the_tp_plan(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("SPILLOVER_NO_NCCL", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    argv = ["plan", "-m", str(tmp_path), "--gpu", "80GiB", "--gpu", "80GiB", "--cpu", "64GiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tensor-parallel over 2 GPUs" in out and "verdict: fits tensor-parallel" in out
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parallel"] == {"tensor": 2}
    assert [d["device"] for d in doc["devices"]] == ["cuda:0", "cuda:1", "cpu"]
    assert doc["devices"][0]["weight_bytes"] == pytest.approx(llama_params(CFG_8B), rel=0.001)
    monkeypatch.setenv("SPILLOVER_NO_NCCL", "1")
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["parallel"] == {"tensor": 1} and doc["device_map"]["layers"] == ["cuda:0"] * 32


def test_param_slices_cover_each_tensor_once():
    cfg = CFG_8B
    specs = [shard_spec(cfg, r, 4) for r in range(4)]
    q = ["q", "k", "v"]
    rows = [param_slices("layers.0.self_attn.qkv_proj.weight", q, cfg, s) for s in specs]
    assert [sl[0] for sl in rows] == [Slice("q", 0, r * 1024, (r + 1) * 1024) for r in range(4)]
    assert [sl[1] for sl in rows] == [Slice("k", 0, r * 256, (r + 1) * 256) for r in range(4)]
    down = [param_slices("layers.0.mlp.down_proj.weight", ["d"], cfg, s)[0] for s in specs]
    assert down == [Slice("d", 1, r * 3584, (r + 1) * 3584) for r in range(4)]
    odd = cfg.replace(num_attention_heads=12, num_key_value_heads=3, intermediate_size=1536, vocab_size=100)
    vocab = [shard_spec(odd, r, 3) for r in range(3)]  # 100 rows over 3: padded to 34 each for the gather
    assert [(v.vocab_start, v.vocab_end, v.vocab_per_rank) for v in vocab] == [(0, 34, 34), (34, 68, 34),
                                                                               (68, 100, 34)]  # fmt: skip


def test_gguf_slices_equal_cuts_of_the_whole_tensor(smollm2):
    """Row ranges (q/k with llama.cpp's permutation undone per head) and block-aligned column ranges read
    from the Q4_1 file equal the same cuts of the fully loaded tensor."""
    from spillover.loading.source import open_source

    src = open_source(smollm2)
    reader = SliceReader(src)
    q = "model.layers.1.self_attn.q_proj.weight"  # [576, 576], 9 heads of 64
    full = src.load(q, "cpu", torch.float32)
    assert torch.equal(reader.read(Slice(q, 0, 192, 384), "cpu", torch.float32), full[192:384])
    down = "model.layers.1.mlp.down_proj.weight"  # [576, 1536]
    full = src.load(down, "cpu", torch.float32)
    assert torch.equal(reader.read(Slice(down, 1, 512, 1024), "cpu", torch.float32), full[:, 512:1024])
    assert torch.equal(reader.read(Slice(down, 1, 10, 50), "cpu", torch.float32), full[:, 10:50])  # unaligned
    emb = "model.embed_tokens.weight"
    got = reader.read(Slice(emb, 0, 100, 200), "cpu", torch.float32)
    assert torch.equal(got, src.load(emb, "cpu", torch.float32)[100:200])


def test_safetensors_slices(tiny_models):
    from spillover.loading.source import open_source

    src = open_source(str(tiny_models["llama"]))
    reader = SliceReader(src)
    o = "model.layers.0.self_attn.o_proj.weight"
    full = src.load(o, "cpu", torch.float32)
    assert torch.equal(reader.read(Slice(o, 1, 32, 64), "cpu", torch.float32), full[:, 32:64])
    assert torch.equal(reader.read(Slice(o, 0, 8, 16), "cpu", torch.float32), full[8:16])
    assert torch.equal(reader.read(Slice(o, None), "cpu", torch.float32), full)
