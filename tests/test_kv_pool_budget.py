"""The KV pool and the plan inside a --max-memory budget (pure: hypothetical hardware, no torch.cuda).

The cases of issue 11: on an H200 (141 GB, almost all free) a Llama-3-8B shape with `max_memory 8GiB` or
`20GiB` had its paged pool sized from 0.9 of the whole GPU and ran out of memory at load.
"""

from __future__ import annotations

import dataclasses

import pytest

from spillover.config import AutoDeviceMapParams, ModelConfig
from spillover.errors import ConfigError, PlacementError
from spillover.kv.pool import (
    DeviceMemory,
    PoolSettings,
    allocator_limits,
    kv_pool_tokens,
    planned_devices,
    reservation_tokens,
)
from spillover.placement import estimate as E
from spillover.placement import planner as P
from spillover.placement.device_map import DeviceMap
from spillover.placement.inventory import CpuInfo, GpuInfo, Inventory

GiB = 1 << 30
MiB = 1 << 20

LLAMA3_8B = ModelConfig.from_hf(
    {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
     "max_position_embeddings": 131072}
)  # fmt: skip
KV_PER_TOKEN = 2 * 8 * 128 * 2 * 32  # K and V, 8 kv heads x 128, bf16, 32 layers: 128 KiB


def h200(free: int = 140 * GiB) -> Inventory:
    """A probed H200: its context is already paid, so `free` excludes it."""
    gpu = GpuInfo("cuda:0", "NVIDIA H200", 141 * GiB, free, (9, 0), context_included=True)
    return Inventory(gpus=(gpu,), cpu=CpuInfo(128 * GiB, 120 * GiB))


def plan_and_pool(max_memory: dict, params: AutoDeviceMapParams, settings=PoolSettings(), offload="cpu"):
    budgets = P.device_budgets(h200(), P.parse_max_memory(max_memory))
    plan = P.plan_model(LLAMA3_8B, params, budgets, "bf16", None, None, settings.paged, offload=offload)
    P.require_fit(plan)
    devices = planned_devices(plan, plan.device_map, LLAMA3_8B, 2)
    tokens = kv_pool_tokens(
        devices, max_seq_len=params.max_seq_len, max_batch_size=params.max_batch_size,
        max_model_len=LLAMA3_8B.max_position_embeddings, settings=settings,
    )  # fmt: skip
    return plan, devices, tokens


def gpu_total_with_pool(plan: P.Plan, tokens: int) -> int:
    """What the process holds on cuda:0 once the pool of `tokens` tokens is allocated."""
    row = plan.row("cuda:0")
    per_token = KV_PER_TOKEN * len(row.layers) // 32
    return row.weight_bytes + row.activation_bytes + row.other_bytes + tokens * per_token


# ------------------------------------------------------------------ the budget on the plan


def test_a_capped_gpu_budget_is_the_cap_and_counts_the_context():
    (gpu, cpu) = P.device_budgets(h200(), {"cuda:0": 8 * GiB})
    assert gpu.budget_bytes == 8 * GiB and gpu.capped and not cpu.capped
    assert not gpu.context_included  # the row pays for the CUDA context out of the 8 GiB
    uncapped = P.device_budgets(h200())[0]
    assert uncapped.budget_bytes == 140 * GiB and not uncapped.capped and uncapped.context_included
    # a cap above what is free: the process can still hold free + its context, no more
    big = P.device_budgets(h200(free=10 * GiB), {"cuda:0": 100 * GiB})[0]
    assert big.budget_bytes == 10 * GiB + E.CUDA_CONTEXT_BYTES


def test_capped_row_counts_context_kernels_and_graph_pool():
    plan, _, _ = plan_and_pool({"cuda:0": "40GiB"}, AutoDeviceMapParams(4096, 1))
    row = plan.row("cuda:0")
    req = E.requirements(LLAMA3_8B, AutoDeviceMapParams(4096, 1), "bf16")
    assert row.capped and row.other_bytes == E.CUDA_CONTEXT_BYTES + E.CUDA_KERNELS_BYTES + req.graph_pool
    assert row.total_bytes <= row.capacity_bytes <= 40 * GiB


# ------------------------------------------------------------------ issue 11's cases


def test_8gib_budget_defaults_pool_stays_in_the_budget():
    params = AutoDeviceMapParams(4096, 1)
    plan, devices, tokens = plan_and_pool({"cuda:0": "8GiB"}, params)
    # the plan filled the budget with layers: 0.9 of it leaves no more than the reservation, which is kept
    assert tokens == reservation_tokens(4096, 1)
    assert gpu_total_with_pool(plan, tokens) <= 8 * GiB
    # the old rule (0.9 of the whole GPU) would have asked for ~100 GiB of KV here
    old = dataclasses.replace(devices[0], budget_bytes=None, total_bytes=141 * GiB, free_bytes=134 * GiB)
    assert (
        kv_pool_tokens([old], max_seq_len=4096, max_batch_size=1, max_model_len=131072) * KV_PER_TOKEN
        > 90 * GiB
    )


def test_20gib_budget_batch_8_x_8192_pool_holds_the_reservation_inside_the_budget():
    params = AutoDeviceMapParams(8192, 8)
    plan, _, tokens = plan_and_pool({"cuda:0": "20GiB"}, params)
    assert plan.device_map.layers.count("cuda:0") > 0
    assert tokens >= reservation_tokens(8192, 8)
    assert gpu_total_with_pool(plan, tokens) <= 20 * GiB


@pytest.mark.parametrize("budget", [8, 12, 20, 40])
@pytest.mark.parametrize("case", [(4096, 1), (8192, 8), (32768, 1)])
def test_every_grid_point_the_plan_accepts_keeps_the_pool_in_the_budget(budget, case):
    params = AutoDeviceMapParams(*case)
    try:
        plan, _, tokens = plan_and_pool({"cuda:0": f"{budget}GiB"}, params)
    except PlacementError:
        return  # refused before loading: allowed, as long as the message says why (next test)
    if "cuda:0" in plan.device_map.layers:
        assert gpu_total_with_pool(plan, tokens) <= budget * GiB


def test_pa_memory_fraction_is_a_fraction_of_the_budget():
    params = AutoDeviceMapParams(4096, 1)
    _, devices, full = plan_and_pool({"cuda:0": "40GiB"}, params, PoolSettings(memory_fraction=0.9))
    _, _, half = plan_and_pool({"cuda:0": "40GiB"}, params, PoolSettings(memory_fraction=0.6))
    d = devices[0]
    assert full == (int(0.9 * 40 * GiB) - d.used_bytes - d.reserved_bytes) // KV_PER_TOKEN
    assert half == (int(0.6 * 40 * GiB) - d.used_bytes - d.reserved_bytes) // KV_PER_TOKEN


def test_pa_context_len_inside_the_budget_is_exact_and_beyond_it_refused_before_loading():
    params = AutoDeviceMapParams(4096, 1)
    _, _, tokens = plan_and_pool({"cuda:0": "40GiB"}, params, PoolSettings(context_len=50_000))
    assert tokens == 50_000
    with pytest.raises(PlacementError, match=r"--pa-context-len 500000 .*cuda:0.*room for \d+ tokens"):
        plan_and_pool({"cuda:0": "40GiB"}, params, PoolSettings(context_len=500_000))


def test_paged_off_gets_the_reservation_inside_the_budget():
    params = AutoDeviceMapParams(8192, 8)
    plan, _, tokens = plan_and_pool({"cuda:0": "20GiB"}, params, PoolSettings(paged=False))
    assert tokens == 8 * 8192
    assert gpu_total_with_pool(plan, tokens) <= 20 * GiB


def test_streamed_layers_pool_stays_in_the_budget():
    params = AutoDeviceMapParams(4096, 1)
    plan, _, tokens = plan_and_pool({"cuda:0": "8GiB"}, params, offload="stream")
    assert plan.device_map.streamed
    assert gpu_total_with_pool(plan, tokens) <= 8 * GiB


# ------------------------------------------------------------------ the rule itself


def _gpu(budget=None, used=0, reserved=2 * GiB, total=141 * GiB, free=100 * GiB, per_token=128 << 10):
    return DeviceMemory("cuda:0", "cuda", total, free, reserved, per_token, budget, used)


KW = dict(max_seq_len=4096, max_batch_size=2, max_model_len=131072)


def test_budget_rule_ignores_the_rest_of_the_gpu():
    # 0.9 x 20 GiB - 10 GiB weights - 2 GiB reserve = 6 GiB of KV
    got = kv_pool_tokens([_gpu(20 * GiB, 10 * GiB)], **KW)
    assert got == (int(0.9 * 20 * GiB) - 12 * GiB) // (128 << 10)
    # without a budget: today's rule, a fraction of the whole device minus what is in use
    assert kv_pool_tokens([_gpu()], **KW) == (int(0.9 * 141 * GiB) - 41 * GiB - 2 * GiB) // (128 << 10)


def test_budget_too_small_for_the_reservation_after_loading_is_a_placement_error():
    # the weights came out larger than planned: the reservation no longer fits, say so instead of an OOM later
    with pytest.raises(PlacementError, match="KV reservation.*cuda:0"):
        kv_pool_tokens([_gpu(8 * GiB, 7 * GiB, reserved=1 * GiB)], **KW)
    # without a budget the reservation is kept (today's rule: the plan is trusted)
    assert kv_pool_tokens([_gpu(free=1 * GiB)], **KW) == 2 * 4096


def test_cpu_budget_bounds_the_cpu_pool():
    cpu = DeviceMemory("cpu", "cpu", 128 * GiB, 100 * GiB, 1 * GiB, 128 << 10, 4 * GiB, 2 * GiB)
    assert kv_pool_tokens([cpu], **KW) == (1 * GiB) // (128 << 10)  # 4 - 2 - 1 GiB, not 0.2 x 100 GiB
    free = dataclasses.replace(cpu, budget_bytes=None)
    assert kv_pool_tokens([free], **KW) == min(131072, int(100 * GiB * 0.2) // (128 << 10))


# ------------------------------------------------------------------ offload modes the plan accepts / refuses


@pytest.mark.parametrize("case", [(4096, 1), (8192, 8), (32768, 1)])
def test_offload_auto_never_picks_a_streaming_map_that_does_not_fit(case):
    # measured on the H200 grid: auto chose streaming maps short by up to 1.7 GiB and refused runs that
    # computing the spilled layers on the CPU fits
    params = AutoDeviceMapParams(*case)
    for budget in ("4GiB", "8GiB"):
        budgets = P.device_budgets(h200(), P.parse_max_memory({"cuda:0": budget}))
        auto = P.plan_model(LLAMA3_8B, params, budgets, "bf16", offload="auto")
        cpu = P.plan_model(LLAMA3_8B, params, budgets, "bf16", offload="cpu")
        assert auto.fits or not cpu.fits


def test_offload_stream_that_cannot_fit_is_refused_with_the_reason_and_the_alternative():
    budgets = P.device_budgets(h200(), {"cuda:0": 8 * GiB})
    plan = P.plan_model(LLAMA3_8B, AutoDeviceMapParams(8192, 8), budgets, "bf16", offload="stream")
    with pytest.raises(PlacementError, match=r"(?s)cuda:0 needs .* GiB.*--offload cpu"):
        P.require_fit(plan)


def test_allocator_limit_is_the_budget_less_what_lives_outside_torch():
    plan, _, _ = plan_and_pool({"cuda:0": "20GiB"}, AutoDeviceMapParams(4096, 1))
    limits = allocator_limits(plan, {"cuda:0": 141 * GiB})
    assert limits == {"cuda:0": (20 * GiB - E.CUDA_CONTEXT_BYTES - E.CUDA_KERNELS_BYTES) / (141 * GiB)}
    free_plan, _, _ = plan_and_pool({}, AutoDeviceMapParams(4096, 1))  # no budget: torch is not limited
    assert allocator_limits(free_plan, {"cuda:0": 141 * GiB}) == {}


# ------------------------------------------------------------------ the CPU plan (issue 11: it was 1.84x the growth)


def _gguf_tensors(config: ModelConfig, tied: bool) -> dict:
    """A GGUF-like header set: every tensor Q4_1, so loading stages 3 f32 copies of the largest one."""
    specs = E.config_tensors(config, "q4_1")
    if tied:
        specs.pop(E.LM_HEAD_NAME, None)
    return specs


SMOL = ModelConfig.from_hf(
    {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
     "max_position_embeddings": 8192}
)  # fmt: skip


def test_cpu_plan_load_staging_is_not_added_to_what_exists_only_after_it():
    params = AutoDeviceMapParams(8192, 4)
    cpu_only = P.device_budgets(Inventory(gpus=(), cpu=CpuInfo(16 * GiB, 16 * GiB)))
    req = E.requirements(SMOL, params, "f32", _gguf_tensors(SMOL, tied=True))
    assert req.load_staging == 3 * 49152 * 576 * 4  # the tied embeddings: the largest tensor, read first
    assert req.load_staging_after == sum(req.layer_weight) + E.dtype_bytes("f32") * 576  # layers + final norm
    row = P.plan_model(SMOL, params, cpu_only, "f32", _gguf_tensors(SMOL, tied=True)).row("cpu")
    assert row.other_bytes == req.cpu_runtime  # staged before the layers, the KV pool and activations
    # issue 11's case measured 2.20 GiB of growth (benchmarks/RESULTS-fit_grid.md): the plan stays above it,
    # within 1.25x (it was 3.88 GiB, 1.84x, with a 1 GiB runtime reserve and the staging on top)
    assert 2.20 * GiB <= row.total_bytes <= 1.25 * 2.20 * GiB


def test_cpu_plan_counts_the_staging_of_an_untied_head_read_last():
    params = AutoDeviceMapParams(256, 1)
    cpu_only = P.device_budgets(Inventory(gpus=(), cpu=CpuInfo(16 * GiB, 16 * GiB)))
    untied = dataclasses.replace(SMOL, tie_word_embeddings=False)
    req = E.requirements(untied, params, "f32", _gguf_tensors(untied, tied=False))
    assert req.load_staging_after == 0  # lm_head is read last: every other weight is already there
    row = P.plan_model(untied, params, cpu_only, "f32", _gguf_tensors(untied, tied=False)).row("cpu")
    assert row.other_bytes == req.cpu_runtime + req.load_staging - row.kv_cache_bytes - row.activation_bytes


def test_pool_flags_without_paged_attention_are_refused():
    with pytest.raises(ConfigError, match="--pa-context-len .*--no-paged-attn"):
        PoolSettings(paged=False, context_len=8192)
    with pytest.raises(ConfigError, match="--pa-memory-fraction"):
        PoolSettings(paged=False, memory_fraction=0.5)


def test_manual_map_over_a_budget_is_refused_before_loading():
    from spillover.placement.device_map import DeviceMap

    params = AutoDeviceMapParams(4096, 1)
    budgets = P.device_budgets(h200(), {"cuda:0": 8 * GiB})
    plan = P.plan_model(LLAMA3_8B, params, budgets, "bf16", device_map=DeviceMap.single("cuda:0", 32))
    assert not plan.fits  # a manual map is the user's: the plan only warns...
    with pytest.raises(PlacementError, match="cuda:0"):  # ...but the budget refuses it before any weight
        kv_pool_tokens(planned_devices(plan, plan.device_map, LLAMA3_8B, 2), max_seq_len=4096, max_batch_size=1,
                       max_model_len=131072)  # fmt: skip


def test_a_streaming_map_streams_cpu_int4_layers_without_a_dense_copy():
    """An int4 layer computed on the CPU keeps a dense bf16 copy for prompts only in a map that streams
    nothing; in a map that streams, long prompts stream its int4 bytes (quant/isq.unpack_cpu_int4), so the
    staging buffers hold int4 layers and the CPU row counts no copy. fit_grid run 3 overran torch's limit at
    `--isq 4 --max-memory cuda:0=4GiB` when the copy was kept and streamed (546 MB buffers, 130 MiB planned)."""
    params = AutoDeviceMapParams(max_seq_len=4096, max_batch_size=1)
    req = E.requirements(LLAMA3_8B, params, "bf16", None, 4, True)
    weights = 4096 * (6144 + 4096 + 2 * 14336) + 14336 * 4096  # qkv, o, gate_up, down of one layer
    window = max(req.layer_kv)
    assert req.stream_staging([0, 1], [2, 3]) == E.STREAM_BUFFERS * req.layer_weight[2] + window
    assert req.layer_weight[2] < weights * 0.65  # int4 codes + bf16 scales and zeros: 0.625 bytes a weight
    assert req.cpu_extra(2) == 2 * weights  # the dense copy, kept when nothing streams
    streamed = (0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17, 18, 20, 21, 23, 24, 26, 27, 29, 30)
    layers = tuple("cuda:0" if i in streamed else "cpu" for i in range(32))
    run3 = DeviceMap(layers=layers, embed="cpu", head="cuda:0", streamed=streamed)
    budgets = P.device_budgets(h200(), P.parse_max_memory({"cuda:0": "4GiB"}))
    gpu, cpu = (next(r for r in P.evaluate(dm, req, budgets) if r.device == d) for dm, d in
                ((run3, "cuda:0"), (run3, "cpu")))  # fmt: skip
    assert gpu.fits
    cpu_layers = [i for i in range(32) if i not in streamed]
    assert cpu.weight_bytes == req.embed_weight + sum(req.layer_weight[i] for i in range(32))  # no copies
    plain = DeviceMap(layers=layers, embed="cpu", head="cuda:0")  # nothing streamed: the copies are kept
    (row,) = [r for r in P.evaluate(plain, req, budgets) if r.device == "cpu"]
    assert row.weight_bytes == req.embed_weight + sum(req.layer_weight[i] + 2 * weights for i in cpu_layers)
