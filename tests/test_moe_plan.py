"""Plans for real mixture-of-experts configs (config.json of Qwen3-30B-A3B, Qwen3-235B-A22B, Mixtral-8x7B in
tests/configs) on 8/16/24/80 GiB GPUs: attention of every layer on the GPU before any expert, then experts
layer by layer; bytes checked against sizes computed here from the configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spillover.config import AutoDeviceMapParams
from spillover.errors import ConfigError
from spillover.models import model_class
from spillover.placement import planner as P
from spillover.placement.inventory import hypothetical_inventory
from spillover.placement.report import plan_table, plan_to_json

GiB = 1 << 30
CONFIGS = Path(__file__).parent / "configs"
PARAMS = AutoDeviceMapParams(max_seq_len=4096, max_batch_size=1)


def load(name: str):
    raw = json.loads((CONFIGS / name / "config.json").read_text())
    return raw, model_class(raw["model_type"]).config_from_hf(raw)


def sizes(raw: dict) -> dict[str, int]:
    """bf16 bytes per layer of attention + router + norms, of experts, of embed and head; KV per layer."""
    h, hd, heads, kv = (
        raw["hidden_size"],
        raw["head_dim"] if "head_dim" in raw else 128,
        raw["num_attention_heads"],
        raw["num_key_value_heads"],
    )
    E = raw.get("num_experts") or raw["num_local_experts"]
    inter = raw.get("moe_intermediate_size") or raw["intermediate_size"]
    qk_norm = 2 * hd if raw["model_type"] == "qwen3_moe" else 0
    attn = (heads * hd * h) * 2 + (kv * hd * h) * 2 + qk_norm + 2 * h + E * h  # q, o; k, v; norms; router
    return {
        "attn": 2 * attn,
        "experts": 2 * E * 3 * inter * h,
        "embed": 2 * raw["vocab_size"] * h,
        "head": 2 * (raw["vocab_size"] * h + h),
        "kv": 2 * 2 * PARAMS.max_seq_len * kv * hd,
    }  # fmt: skip


def plan(cfg, gpu_gib: float, cpu_gib: float = 1024, isq=None, **kw) -> P.Plan:
    inv = hypothetical_inventory([int(gpu_gib * GiB)], int(cpu_gib * GiB))
    return P.plan_model(cfg, PARAMS, P.device_budgets(inv), "bf16", None, isq, **kw)


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b"])
@pytest.mark.parametrize("gpu", [8, 16, 24, 80])
def test_attention_first_then_experts_bytes_checked(name, gpu):
    raw, cfg = load(name)
    s, n = sizes(raw), cfg.num_hidden_layers
    p = plan(cfg, gpu)
    assert p.fits, p.verdict
    dm, g, cpu = p.device_map, p.row("cuda:0"), p.row("cpu")
    on_gpu = [i for i in range(n) if dm.layers[i] == "cuda:0"]
    experts_gpu = [i for i in range(n) if dm.experts[i] == "cuda:0"]
    # attention before experts: no expert on the GPU while some layer's attention is on the CPU, and layers
    # (then experts) fill from layer 0
    assert on_gpu == list(range(len(on_gpu))) and experts_gpu == list(range(len(experts_gpu)))
    assert not experts_gpu or len(on_gpu) == n
    assert set(experts_gpu) <= set(on_gpu)
    if len(experts_gpu) == n:  # the whole model fits: nothing moves
        assert dm.is_single_device() and gpu == 80 and name == "qwen3-30b-a3b"
    elif experts_gpu:
        assert dm.head == "cuda:0"  # the head before any expert (a decode token reads all of it)
    # the GPU row, computed here
    want = (
        len(on_gpu) * s["attn"] + len(experts_gpu) * s["experts"] + (s["head"] if dm.head == "cuda:0" else 0)
    )
    want += s["embed"] if dm.embed == "cuda:0" else 0
    assert g.weight_bytes == want
    assert g.kv_cache_bytes == len(on_gpu) * s["kv"]
    # the CPU row: the spilled experts and whole layers that did not fit
    cpu_layers = n - len(on_gpu)
    want_cpu = (n - len(experts_gpu)) * s["experts"] + cpu_layers * s["attn"]
    want_cpu += (s["embed"] if dm.embed == "cpu" else 0) + (s["head"] if dm.head == "cpu" else 0)
    assert cpu.weight_bytes == want_cpu
    assert cpu.experts == tuple(i for i in on_gpu if i not in experts_gpu)
    # as many experts as fit: one more layer's experts would not
    if len(on_gpu) == n and len(experts_gpu) < n:
        assert g.headroom_bytes < s["experts"] + (s["embed"] if dm.embed == "cpu" else 0)


def test_qwen3_30b_numbers_at_24_gib():
    """Qwen3-30B-A3B bf16 (61 GB) on 24 GiB: 48 x 39 MiB of attention + 1.2 GiB of head stay on the GPU, then
    the experts of the first layers (1.13 GiB each); the rest of the experts in CPU memory."""
    raw, cfg = load("qwen3-30b-a3b")
    s = sizes(raw)
    assert s["experts"] == 128 * 3 * 768 * 2048 * 2  # 1.125 GiB per layer
    p = plan(cfg, 24)
    k = sum(1 for d in p.device_map.experts if d == "cuda:0")
    assert 14 <= k <= 18, k  # (24 GiB - margins - 48 layers' attention and KV - head) / 1.125 GiB
    doc = plan_to_json(p)
    assert doc["experts"] == {str(i): ("cuda:0" if i < k else "cpu") for i in range(48)}
    assert doc["devices"][1]["experts_of_layers"] == list(range(k, 48))
    assert {"stage": "layers.47.experts", "device": "cpu", "weights": "cpu"} in doc["stages"]
    assert {"stage": "layers.47", "device": "cuda:0", "weights": "cuda:0"} in doc["stages"]
    assert any("experts of layers" in n and "computed there" in n for n in p.notes)


def test_isq4_puts_more_experts_on_the_gpu():
    _, cfg = load("qwen3-30b-a3b")
    bf16 = plan(cfg, 16)
    q4 = plan(cfg, 16, isq=4)
    count = lambda p: sum(1 for d in p.device_map.experts if d == "cuda:0")  # noqa: E731
    assert count(q4) > 2 * count(bf16)
    assert plan(cfg, 24, isq=4).device_map.is_single_device()  # ~17 GiB in int4


def test_plan_table_shows_experts_per_device():
    _, cfg = load("mixtral-8x7b")
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(plan_table(plan(cfg, 24)))
    text = console.export_text()
    assert "experts of" in text and "MoE" in text


def test_dense_models_have_no_expert_stages():
    from spillover.config import ModelConfig

    cfg = ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
    )  # fmt: skip
    p = plan(cfg, 8)
    assert p.device_map.experts == () and plan_to_json(p)["experts"] is None
    assert not any(s["stage"].endswith("experts") for s in plan_to_json(p)["stages"])


def test_n_cpu_moe_puts_the_first_n_layers_experts_on_the_cpu():
    raw, cfg = load("qwen3-30b-a3b")
    s = sizes(raw)
    p = plan(cfg, 80, n_cpu_moe=10)
    dm = p.device_map
    assert dm.experts == ("cpu",) * 10 + ("cuda:0",) * 38 and dm.layers == ("cuda:0",) * 48
    assert p.fits and p.manual
    assert p.row("cpu").weight_bytes == 10 * s["experts"]
    assert p.row("cuda:0").weight_bytes == 48 * s["attn"] + 38 * s["experts"] + s["head"] + s["embed"]
    assert plan(cfg, 80, n_cpu_moe=0).device_map.experts == ("cuda:0",) * 48
    # on top of a manual map: its layers, the first N layers' experts on the CPU
    from spillover.placement.device_map import parse_device_layers

    manual = parse_device_layers("40", 48, 1)
    dm = plan(cfg, 80, device_map=manual, n_cpu_moe=4).device_map
    assert dm.layers == manual.layers and dm.experts == ("cpu",) * 4 + manual.layers[4:]


def test_n_cpu_moe_too_small_warns_not_fits(caplog):
    _, cfg = load("qwen3-30b-a3b")
    p = plan(cfg, 24, n_cpu_moe=2)  # 46 layers of experts do not fit 24 GiB
    assert not p.fits and "this manual device map does not fit" in p.verdict


@pytest.mark.parametrize(
    "n, message",
    [(-1, "must be a number of layers"), (49, "more than the model's 48 layers"), (True, "must be a number"),
     ("3", "must be a number")],
)  # fmt: skip
def test_n_cpu_moe_bad_values(n, message):
    _, cfg = load("qwen3-30b-a3b")
    with pytest.raises(ConfigError, match=message):
        plan(cfg, 24, n_cpu_moe=n)


def test_n_cpu_moe_on_a_dense_model_or_without_gpu():
    from spillover.errors import SpilloverError

    _, cfg = load("qwen3-30b-a3b")
    with pytest.raises(SpilloverError, match="no GPU is visible"):
        P.plan_model(
            cfg, PARAMS, P.device_budgets(hypothetical_inventory([], 256 * GiB)), "bf16", n_cpu_moe=4
        )
    from spillover.config import ModelConfig

    dense = ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1000}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="applies to mixture-of-experts models"):
        plan(dense, 24, n_cpu_moe=1)


def test_cli_plan_n_cpu_moe_and_json(capsys):
    from spillover.cli.main import main

    path = str(CONFIGS / "mixtral-8x7b")
    assert main(["plan", "-m", path, "--gpu", "80GiB", "--cpu", "256GiB", "--n-cpu-moe", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [doc["experts"][str(i)] for i in range(32)] == ["cpu"] * 8 + ["cuda:0"] * 24
    assert main(["plan", "-m", path, "--gpu", "80GiB", "--n-cpu-moe", "40"]) != 0
    assert "error: --n-cpu-moe 40 is more than the model's 32 layers" in capsys.readouterr().err


@settings(max_examples=25)
@given(
    name=st.sampled_from(["qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b"]),
    gpu=st.floats(2, 300),
    isq=st.sampled_from([None, 8, 4]),
    seq=st.sampled_from([1024, 4096, 32768]),
)
def test_attention_always_before_experts(name, gpu, isq, seq):
    """On any GPU size: an expert on the GPU only when every layer's attention is there; experts fill from
    layer 0; a plan that fits keeps every device within its capacity."""
    _, cfg = load(name)
    n = cfg.num_hidden_layers
    inv = hypothetical_inventory([int(gpu * GiB)], 4096 * GiB)
    p = P.plan_model(cfg, AutoDeviceMapParams(max_seq_len=seq), P.device_budgets(inv), "bf16", None, isq)
    dm = p.device_map
    on_gpu = [i for i in range(n) if dm.layers[i] != "cpu"]
    experts = [i for i in range(n) if dm.experts[i] != "cpu"]
    assert on_gpu == list(range(len(on_gpu))) and experts == list(range(len(experts)))
    assert not experts or len(on_gpu) == n
    assert p.fits == all(r.headroom_bytes >= 0 for r in p.rows)
