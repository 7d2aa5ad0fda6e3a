"""The planner on hypothetical hardware: rules, budgets, failures, and properties that must always hold."""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.errors import ConfigError, PlacementError, UnknownDeviceError
from spillover.placement import estimate as E
from spillover.placement import planner as P
from spillover.placement.device_map import parse_device_layers
from spillover.placement.inventory import CpuInfo, GpuInfo, Inventory, hypothetical_inventory
from spillover.placement.report import plan_to_json

GiB = 1 << 30
MiB = 1 << 20

LLAMA3_8B = ModelConfig.from_hf(
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
)  # fmt: skip
DEFAULT = AutoDeviceMapParams()


def budgets(gpus: list[float], cpu: float = 64, **kw) -> tuple[P.DeviceBudget, ...]:
    inv = hypothetical_inventory([int(g * GiB) for g in gpus], int(cpu * GiB), **kw)
    return P.device_budgets(inv)


def plan(gpus, cpu=64, params=DEFAULT, isq=None, config=LLAMA3_8B, **kw):
    return P.plan_model(config, params, budgets(gpus, cpu), "bf16", None, isq, **kw)


def gpu_layers(p: P.Plan) -> int:
    return sum(1 for d in p.device_map.layers if d != "cpu")


# ------------------------------------------------------------------ rules


def test_fits_on_gpu0_means_no_change():
    p = plan([80])
    assert p.fits and p.device_map.devices() == ["cuda:0"]
    assert "no change" in p.verdict


def test_fits_on_gpu0_even_with_a_second_gpu():
    p = plan([80, 80])
    assert p.device_map.devices() == ["cuda:0"] and p.row("cuda:1").total_bytes == 0


def test_offload_keeps_prefix_on_gpu_and_rest_on_cpu():
    p = plan([12])
    layers = p.device_map.layers
    n = gpu_layers(p)
    assert 0 < n < 32 and layers == ("cuda:0",) * n + ("cpu",) * (32 - n)
    assert p.fits and "fits with offload" in p.verdict
    assert p.device_map.embed == "cpu"  # the gather is cheap on the CPU; GPU bytes go to layers


def gpu_budget(capacity: int) -> tuple[P.DeviceBudget, ...]:
    return (P.DeviceBudget("cuda:0", "cuda", capacity, capacity, False), P.make_budget("cpu", 64 * GiB))


def test_layers_before_head_then_head_in_leftover_room():
    req = E.requirements(LLAMA3_8B, DEFAULT, "bf16")
    fixed = req.activation("cuda", True, False, False) + req.other("cuda", True, False, graphs=True)
    layers = sum(req.layer_weight) + sum(req.layer_kv)
    head_cost = req.activation("cuda", True, True, False) - req.activation("cuda", True, False, False)
    head_cost += req.head_weight
    # room for every layer but not lm_head: layers stay, the head goes to the CPU (the embeddings, 1 GB with
    # less activation than the head's, may take the room left)
    p = P.plan_auto(req, gpu_budget(fixed + layers + head_cost - 1))
    assert p.device_map.layers == ("cuda:0",) * 32 and p.device_map.head == "cpu"
    # room for lm_head too: it goes on the GPU, the embeddings (a gather) still on the CPU
    p = P.plan_auto(req, gpu_budget(fixed + layers + head_cost))
    assert p.device_map.head == "cuda:0" and p.device_map.embed == "cpu"
    assert p.row("cuda:0").headroom_bytes == 0 and p.fits


def test_partial_offload_head_only_when_leftover_fits_it():
    req = E.requirements(LLAMA3_8B, DEFAULT, "bf16")
    fixed = req.activation("cuda", True, False, False) + req.other("cuda", True, False, graphs=True)
    per_layer = req.layer_weight[0] + req.layer_kv[0]
    p = P.plan_auto(req, gpu_budget(fixed + 10 * per_layer + per_layer // 2))
    assert p.device_map.layers_on("cuda:0") == list(range(10))
    assert p.device_map.head == "cpu"  # half a layer of room is less than lm_head (1 GiB)


def test_tied_embeddings_follow_the_head_and_are_stored_once():
    cfg = LLAMA3_8B.replace(tie_word_embeddings=True)
    p = plan([16], config=cfg)
    if p.device_map.head != "cpu":
        assert p.device_map.embed == p.device_map.head


def test_multi_gpu_fills_in_ordinal_order_and_notes_tp():
    p = plan([8, 8], params=AutoDeviceMapParams(max_seq_len=8192))
    devs = [d for d in p.device_map.layers]
    assert devs == sorted(devs, key=lambda d: (d == "cpu", d))
    assert p.device_map.layers_on("cuda:0") and p.device_map.layers_on("cuda:1")
    assert P.TP_NOTE in p.notes


def test_no_gpu_everything_on_cpu():
    p = plan([], cpu=64)
    assert p.device_map.devices() == ["cpu"] and p.fits


def test_does_not_fit_reports_shortfall_per_device_and_what_helps():
    p = plan([8], cpu=10)  # 15 GiB of weights, 18 of memory with the reserves
    assert not p.fits
    assert "does not fit, even with CPU offload" in p.verdict
    assert "cpu needs" in p.verdict and "short by" in p.verdict and "GiB" in p.verdict
    assert "would fit with --isq 4" in p.hints
    with pytest.raises(PlacementError) as e:
        P.require_fit(p)
    assert "short by" in str(e.value) and "--isq 4" in str(e.value) and e.value.exit_code == 1


def test_hint_for_sequence_length():
    p = plan([8], cpu=24, params=AutoDeviceMapParams(max_seq_len=131072))
    assert not p.fits and any(h.startswith("would fit with --max-seq-len") for h in p.hints)


def test_manual_map_that_does_not_fit_warns_with_numbers(caplog):
    dm = parse_device_layers("32", 32, 1)
    with caplog.at_level(logging.WARNING):
        p = P.plan_model(LLAMA3_8B, DEFAULT, budgets([8]), "bf16", device_map=dm)
    assert not p.fits and p.manual and p.device_map == dm
    assert any(
        "this manual device map does not fit" in r.message and "cuda:0 needs" in r.message
        for r in caplog.records
    )
    assert P.require_fit(p) is p  # a warning, not an error


def test_manual_map_that_fits_is_kept():
    dm = parse_device_layers("4", 32, 1)
    p = P.plan_model(LLAMA3_8B, DEFAULT, budgets([24]), "bf16", device_map=dm)
    assert p.fits and p.device_map == dm


def test_json_has_the_promised_keys():
    doc = plan_to_json(plan([12]))
    assert {"model", "num_layers", "fits", "params", "devices"} <= doc.keys()
    assert set(doc["params"]) >= {"max_seq_len", "max_batch_size", "max_num_images", "max_image_length",
                                  "paged_attention", "isq", "dtype"}  # fmt: skip
    for d in doc["devices"]:
        assert {"device", "capacity_bytes", "layers", "weight_bytes", "kv_cache_bytes", "activation_bytes",
                "other_bytes"} <= d.keys()  # fmt: skip


# ------------------------------------------------------------------ budgets


def test_budget_is_min_of_free_and_cap_minus_margin():
    inv = hypothetical_inventory([24 * GiB], 64 * GiB)
    b = P.device_budgets(inv, {"cuda:0": 8 * GiB})
    assert b[0].budget_bytes == 8 * GiB
    assert b[0].capacity_bytes == 8 * GiB - P.GPU_SAFETY_MARGIN_MIN
    b = P.device_budgets(inv, {"cuda:0": 100 * GiB, "cpu": 10 * GiB})
    assert b[0].budget_bytes == 24 * GiB and b[1].budget_bytes == 10 * GiB
    assert b[0].capacity_bytes == 24 * GiB - int(24 * GiB * P.GPU_SAFETY_MARGIN_FRACTION)


def test_unified_memory_splits_system_ram():
    inv = hypothetical_inventory([], 64 * GiB, unified=True)
    gpu, cpu = P.device_budgets(inv, igpu_fraction=0.75)
    assert gpu.budget_bytes == 48 * GiB and cpu.budget_bytes == 16 * GiB
    gpu, cpu = P.device_budgets(inv, igpu_fraction=1.0)
    assert gpu.budget_bytes == 64 * GiB and cpu.budget_bytes == 0 and cpu.capacity_bytes == 0


def test_unified_real_probe_shape_with_wired_limit():
    mac = Inventory(
        gpus=(GpuInfo("mps", "Apple", 32 * GiB, 30 * GiB, unified=True, wired_limit_bytes=20 * GiB),),
        cpu=CpuInfo(32 * GiB, 30 * GiB),
    )
    gpu, cpu = P.device_budgets(mac)
    assert gpu.budget_bytes == 20 * GiB and cpu.budget_bytes == 10 * GiB


def test_max_memory_parsing():
    assert P.parse_max_memory(["cuda:0=8GiB", "cpu=100GiB"]) == {"cuda:0": 8 * GiB, "cpu": 100 * GiB}
    assert P.parse_max_memory({0: "1GiB", "CUDA:1": 2 * GiB}) == {"cuda:0": GiB, "cuda:1": 2 * GiB}
    with pytest.raises(ConfigError, match="DEVICE=SIZE"):
        P.parse_max_memory(["8GiB"])
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        P.parse_max_memory(["tpu=8GiB"])
    with pytest.raises(ConfigError, match="names cuda:0 twice"):
        P.parse_max_memory(["0=1GiB", "cuda:0=2GiB"])


def test_max_memory_for_a_missing_device():
    with pytest.raises(UnknownDeviceError, match="does not have"):
        P.device_budgets(hypothetical_inventory([8 * GiB], 8 * GiB), {"cuda:1": GiB})


def test_probed_gpu_does_not_pay_the_context_twice():
    probed = Inventory(
        (GpuInfo("cuda:0", "H100", 80 * GiB, 79 * GiB, context_included=True),), CpuInfo(GiB, GiB)
    )
    hypo = hypothetical_inventory([79 * GiB], GiB)
    a = P.plan_model(LLAMA3_8B, DEFAULT, P.device_budgets(probed), "bf16").row("cuda:0")
    b = P.plan_model(LLAMA3_8B, DEFAULT, P.device_budgets(hypo), "bf16").row("cuda:0")
    assert b.other_bytes - a.other_bytes == E.CUDA_CONTEXT_BYTES


# ------------------------------------------------------------------ properties

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

configs = st.builds(
    lambda layers, hidden, heads, kv_div, ffn_mult, vocab, tied: ModelConfig.from_hf(
        {
            "model_type": "llama",
            "hidden_size": hidden * heads,
            "intermediate_size": hidden * heads * ffn_mult,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // kv_div),
            "vocab_size": vocab,
            "tie_word_embeddings": tied,
        }
    ),  # fmt: skip
    layers=st.integers(1, 40),
    hidden=st.sampled_from([32, 64, 128]),
    heads=st.sampled_from([4, 8, 16, 32]),
    kv_div=st.sampled_from([1, 2, 4]),
    ffn_mult=st.integers(2, 4),
    vocab=st.integers(1000, 150_000),
    tied=st.booleans(),
)
params = st.builds(AutoDeviceMapParams, max_seq_len=st.integers(1, 65536), max_batch_size=st.integers(1, 16))
gib = st.floats(0, 96)


def make(config, p, gpus, cpu, isq=None, paged=True):
    req = E.requirements(config, p, "bf16", None, isq, paged)
    b = budgets(gpus, cpu)
    return req, b, P.plan_auto(req, b)


@SETTINGS
@given(config=configs, p=params, gpus=st.lists(gib, max_size=3), cpu=gib)
def test_capacity_never_exceeded_and_all_layers_placed_contiguously(config, p, gpus, cpu):
    req, b, plan_ = make(config, p, gpus, cpu)
    dm = plan_.device_map
    assert len(dm.layers) == config.num_hidden_layers
    for row in plan_.rows:
        if row.device != "cpu":
            assert row.fits, row  # GPUs are only ever filled up to their capacity
    if plan_.fits:
        assert all(r.total_bytes <= r.capacity_bytes for r in plan_.rows)
    # contiguous ranges, GPU-first in ordinal order, then CPU
    order = [b_.device for b_ in b]
    idx = [order.index(d) for d in dm.layers]
    assert idx == sorted(idx)
    # the plan's rows add up to everything the model needs
    assert sum(r.kv_cache_bytes for r in plan_.rows) == sum(req.layer_kv)


@SETTINGS
@given(config=configs, p=params, gpus=st.lists(gib, min_size=1, max_size=3), cpu=gib, extra=st.floats(0, 64),
       which=st.integers(0, 2))  # fmt: skip
def test_more_gpu_memory_never_puts_fewer_layers_on_gpu(config, p, gpus, cpu, extra, which):
    which %= len(gpus)
    more = list(gpus)
    more[which] += extra
    _, _, a = make(config, p, gpus, cpu)
    _, _, b = make(config, p, more, cpu)
    assert gpu_layers(b) >= gpu_layers(a)


@SETTINGS
@given(config=configs, p=params, gpu=gib, cpu=gib)
def test_fits_on_gpu_means_no_change(config, p, gpu, cpu):
    req, b, plan_ = make(config, p, [gpu], cpu)
    whole = P.DeviceMap.single("cuda:0", config.num_hidden_layers)
    if P.device_row(whole, req, b[0]).fits:
        assert plan_.device_map == whole


@SETTINGS
@given(config=configs, p=params, gpu=gib, cpu=gib)
def test_isq4_fits_at_least_as_many_layers_as_bf16(config, p, gpu, cpu):
    _, _, bf16 = make(config, p, [gpu], cpu)
    _, _, q4 = make(config, p, [gpu], cpu, isq=4)
    assert gpu_layers(q4) >= gpu_layers(bf16)


def test_isq4_fits_strictly_more_layers_on_a_small_gpu():
    assert gpu_layers(plan([12], isq=4)) > gpu_layers(plan([12]))


@SETTINGS
@given(config=configs, p=params, gpus=st.lists(gib, max_size=3), cpu=gib)
def test_plans_are_deterministic(config, p, gpus, cpu):
    assert make(config, p, gpus, cpu)[2] == make(config, p, gpus, cpu)[2]
