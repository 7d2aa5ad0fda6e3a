"""The offload cost model and the planner's offload modes, on hypothetical hardware."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.errors import ConfigError
from spillover.placement import cost_model as C
from spillover.placement import planner as P
from spillover.placement.estimate import requirements
from spillover.placement.inventory import hypothetical_inventory
from spillover.placement.report import plan_to_json

GiB = 1 << 30
LLAMA3_8B = ModelConfig.from_hf(
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}
)  # fmt: skip
LAYER = 436_207_616  # bytes of one Llama-3-8B bf16 layer
H100 = C.Bandwidths()
DESKTOP = C.Bandwidths(pinned_h2d_gbps=12.0, cpu_gemv_gbps=60.0, source="PCIe 4.0 desktop")


def plan(gpu_gib: float, mode: str, bw: C.Bandwidths = H100) -> P.Plan:
    b = P.device_budgets(hypothetical_inventory([80 * GiB], 120 * GiB), {"cuda:0": int(gpu_gib * GiB)})
    return P.plan_model(LLAMA3_8B, AutoDeviceMapParams(), b, "bf16", None, offload=mode, bandwidths=bw)


def test_spread_is_even_and_exact():
    assert C.spread(list(range(10)), 0) == ()
    assert C.spread(list(range(4)), 4) == (0, 1, 2, 3)
    s = C.spread(list(range(10, 30)), 5)
    assert len(s) == 5 and len(set(s)) == 5 and all(b - a == 4 for a, b in zip(s, s[1:], strict=False))


@given(st.integers(0, 30), st.integers(0, 30))
def test_spread_picks_n_distinct(k, n):
    s = C.spread(list(range(k)), n)
    assert len(s) == min(k, n) == len(set(s))


def test_h100_split_beats_either_path_alone():
    resident = list(range(18))
    sizes = [LAYER] * 18
    split = C.best_split(sizes, resident, H100)
    all_cpu = C.step_seconds(sizes, (), resident, 1, H100).seconds
    all_stream = C.step_seconds(sizes, resident, (), 1, H100).seconds
    assert 0 < len(split.streamed) < 18
    assert split.decode.seconds < 0.85 * min(all_cpu, all_stream)  # both engines at once
    assert split.decode.seconds >= 18 * LAYER / (H100.host_mem_gbps * 1e9)  # but they share host DRAM


def test_cpu_wins_decode_when_pcie_is_slow():
    split = C.best_split([LAYER] * 8, list(range(8)), DESKTOP)
    assert len(split.cpu) > len(split.streamed)


def test_long_prefill_streams_everything():
    sizes = [LAYER] * 18
    split = C.best_split(sizes, list(range(18)), H100)
    t = C.gpu_prefill_tokens(sizes, split.streamed, split.cpu, H100)
    assert t is not None and 1 < t <= 128  # decode keeps the split, a 128-token prompt streams all


def test_prefill_is_flop_bound_on_cpu():
    assert C.cpu_layer_seconds(LAYER, 4096, H100) > 100 * C.cpu_layer_seconds(LAYER, 1, H100)


@pytest.mark.parametrize("mode", ["cpu", "stream", "auto"])
@pytest.mark.parametrize("gpu", [8, 12])
def test_modes_fit_and_keep_kv_with_compute(mode, gpu):
    p = plan(gpu, mode)
    dm = p.device_map
    assert p.fits
    if mode == "cpu":
        assert not dm.streamed and dm.layers_on("cpu")
    if mode == "stream":
        assert dm.streamed and not dm.layers_on("cpu") and dm.head == "cuda:0"
    for i in dm.streamed:  # streamed layers run (and keep KV) on the GPU, weights counted on the CPU
        assert dm.layers[i] == "cuda:0" and dm.weight_device(i) == "cpu"
    doc = plan_to_json(p)
    assert doc["offload"]["streamed"] == list(dm.streamed)
    assert set(doc["offload"]["kv_cache"]) == {str(i) for i in (*dm.streamed, *dm.layers_on("cpu"))}


def test_streamed_weights_are_counted_in_cpu_memory_and_staging_on_gpu():
    p = plan(8, "stream")
    gpu, cpu = p.row("cuda:0"), p.row("cpu")
    streamed = p.device_map.streamed
    assert cpu.streamed == streamed and gpu.streamed == streamed
    assert cpu.weight_bytes >= len(streamed) * LAYER
    assert gpu.other_bytes >= 2 * LAYER  # staging buffers


def test_auto_predicts_faster_than_cpu_on_h100():
    auto, cpu = plan(8, "auto"), plan(8, "cpu")
    req_notes = [n for n in auto.notes if n.startswith("offload:")]
    assert auto.device_map.streamed and auto.device_map.layers_on("cpu") and req_notes
    assert "streamed" in auto.device_map.summary() and cpu.device_map.summary() != auto.device_map.summary()


def long_prompts_budgets(gpu_gib: float) -> tuple:
    return P.device_budgets(hypothetical_inventory([141 * GiB], 128 * GiB), {"cuda:0": int(gpu_gib * GiB)})


def long_prompts_plan(gpu_gib: float, mode: str, seq: int = 8192, batch: int = 8) -> P.Plan:
    b = long_prompts_budgets(gpu_gib)
    params = AutoDeviceMapParams(max_seq_len=seq, max_batch_size=batch)
    return P.plan_model(LLAMA3_8B, params, b, "bf16", None, offload=mode, bandwidths=H100)


@pytest.mark.parametrize(("gib", "seq", "batch"), [(4, 8192, 8), (8, 8192, 8), (4, 32768, 1)])
def test_auto_keeps_room_to_stream_cpu_layers_for_long_prompts(gib, seq, batch):
    """Where streaming every step does not fit (the streamed layers' KV at 8 x 8k), auto used to compute every
    prompt chunk of the CPU layers on the CPU (the fit grid's 240 s timeouts): it now keeps two staging
    buffers and a KV window on the GPU, so a long prompt streams them, and --offload cpu still opts out."""
    auto, cpu = long_prompts_plan(gib, "auto", seq, batch), long_prompts_plan(gib, "cpu", seq, batch)
    dm, gpu = auto.device_map, auto.row("cuda:0")
    assert auto.fits and dm.layers_on("cpu") and dm.stream_gpu() == "cuda:0"
    assert dm.prefill_stream == "cuda:0" or dm.streamed
    # the room: two buffers of a layer and one layer's KV window, counted in the GPU's "other"
    kv_layer = 2 * 8 * 128 * 2 * seq * batch
    req = requirements(LLAMA3_8B, AutoDeviceMapParams(max_seq_len=seq, max_batch_size=batch), "bf16")
    budget = next(b for b in long_prompts_budgets(gib) if b.device == "cuda:0")
    without = P.device_row(dataclasses.replace(dm, prefill_stream=None), req, budget)
    room = gpu.other_bytes - without.other_bytes
    assert 2 * LAYER + kv_layer <= room <= 2 * LAYER + kv_layer + (1 << 20)  # (the paged pool's rounding)
    assert gpu.total_bytes <= gib * GiB
    assert cpu.device_map.stream_gpu() is None and len(cpu.device_map.layers_on("cpu")) < len(
        dm.layers_on("cpu")
    )
    doc = plan_to_json(auto)["offload"]
    assert doc["prefill_streamed_to"] == "cuda:0"
    # the predicted prompt chunk: streaming every CPU layer beats computing them on the CPU by far
    cpu_layers = dm.layers_on("cpu")
    sizes = [LAYER] * 32
    on_cpu = C.step_seconds(sizes, (), cpu_layers, 2048, H100).seconds
    streamed = C.step_seconds(sizes, cpu_layers, (), 2048, H100).seconds
    assert streamed * 20 < on_cpu


def test_short_prompts_keep_the_fastest_decode_map():
    """Prompts below the cost model's streaming threshold: no room is kept for them."""
    short = long_prompts_plan(4, "auto", seq=8, batch=1)
    assert short.device_map.prefill_stream is None


def test_fits_on_gpu_no_offload():
    p = plan(40, "auto")
    assert p.device_map.devices() == ["cuda:0"] and not p.device_map.streamed


def test_unknown_mode():
    with pytest.raises(ConfigError, match="--offload"):
        plan(8, "disk")


def test_bandwidths_from_calibration():
    class Cal:
        pinned_h2d_gbps, cpu_gemv_gbps, gpu_mem_gbps = 25.0, 80.0, None
        device_name, measured_at = "GPU X", "2026-01-01"

    bw = C.Bandwidths.from_calibration(Cal())
    assert (bw.pinned_h2d_gbps, bw.cpu_gemv_gbps, bw.gpu_mem_gbps) == (25.0, 80.0, 3019.0)
    assert C.Bandwidths.from_calibration(None) == C.Bandwidths()
