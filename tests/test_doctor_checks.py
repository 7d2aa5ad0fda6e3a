"""`spillover doctor`'s decisions, on made-up machines: the facts are faked, the checks are real."""

from __future__ import annotations

import dataclasses
import json

import pytest

from spillover.config import AutoDeviceMapParams
from spillover.diagnostics import cuda_compat
from spillover.diagnostics.checks import Check, Level, arch_supported, evaluate, exit_code
from spillover.diagnostics.facts import CpuFacts, Facts, HfCacheFacts, ModelFacts, SoftwareFacts
from spillover.loading.source import open_source
from spillover.placement.inventory import CpuInfo, GpuInfo, Inventory, hypothetical_inventory
from spillover.placement.resolve import plan_for_source

GiB = 1 << 30

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
}  # fmt: skip

X86_FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile"})


def h100(i: int = 0, free: int = 79 * GiB) -> GpuInfo:
    return GpuInfo(f"cuda:{i}", "NVIDIA H100 80GB HBM3", 80 * GiB, free, (9, 0), context_included=True)


def machine(**kw) -> Facts:
    """A healthy H100 box; override any part."""
    software = SoftwareFacts(
        os="Linux 6.8.0 (x86_64)", python="3.11.7", spillover="0.1.0", torch="2.13.0+cu128",
        torch_cuda="12.8", driver_version="570.124.06", driver_cuda="12.8", nvidia_gpu_present=True,
        cuda_available=True, cuda_arch_list=("sm_80", "sm_90", "sm_100", "compute_120"),
    )  # fmt: skip
    defaults = dict(
        software=software,
        cpu=CpuFacts("AMD EPYC 9454", "x86_64", 16, 8, 16, 16, X86_FLAGS, "AVX512"),
        inventory=Inventory((h100(),), CpuInfo(128 * GiB, 120 * GiB)),
        hf=HfCacheFacts("/home/u/.cache/huggingface/hub", "default", True, True, 500 * GiB, False),
    )
    return Facts(**{**defaults, **kw})


def sw(**kw) -> SoftwareFacts:
    return dataclasses.replace(machine().software, **kw)


def by_name(checks: list[Check], name: str) -> Check:
    return next(c for c in checks if c.name == name)


def test_healthy_machine_passes():
    checks = evaluate(machine())
    assert exit_code(checks) == 0
    assert all(c.level is Level.PASS for c in checks), [c for c in checks if c.level is not Level.PASS]
    assert "flash" in by_name(checks, "cuda:0 attention").message
    assert "dedicated memory" in by_name(checks, "cuda:0").message


def test_driver_too_old_for_the_cuda_build_is_an_error():
    checks = evaluate(
        machine(software=sw(driver_version="470.82.01", driver_cuda="11.4", cuda_available=False))
    )
    driver = by_name(checks, "driver")
    assert driver.level is Level.ERROR and "525.60.13" in driver.message and driver.hint
    assert exit_code(checks) == 1


def test_driver_between_family_floor_and_toolkit_driver_warns():
    driver = by_name(evaluate(machine(software=sw(driver_version="535.104.05"))), "driver")
    assert driver.level is Level.WARN and "570.26" in driver.message


def test_driver_table():
    assert cuda_compat.toolkit_minimum("12.8") == "570.26"
    assert cuda_compat.toolkit_minimum("12.7") == "560.28.03"  # nearest older minor in the table
    assert cuda_compat.major_minimum("13.0") == "580.65.06"
    assert cuda_compat.driver_at_least("570.124.06", "570.26")
    assert not cuda_compat.driver_at_least("525.60", "525.60.13")


def test_cpu_torch_on_nvidia_machine_is_an_error_with_the_install_command():
    facts = machine(
        software=sw(torch="2.13.0+cpu", torch_cuda=None, cuda_available=False, cuda_arch_list=()),
        inventory=Inventory((), CpuInfo(128 * GiB, 120 * GiB)),
    )
    checks = evaluate(facts)
    build = by_name(checks, "torch-build")
    assert build.level is Level.ERROR
    assert (
        "pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128" in build.hint
    )
    assert exit_code(checks) == 1


def test_cpu_torch_without_nvidia_gpu_is_fine():
    facts = machine(
        software=sw(torch="2.13.0+cpu", torch_cuda=None, driver_version=None, nvidia_gpu_present=False),
        inventory=Inventory((), CpuInfo(16 * GiB, 12 * GiB)),
    )
    checks = evaluate(facts)
    assert exit_code(checks) == 0
    assert "CPU-only" in by_name(checks, "torch-build").message


def test_cuda_not_initialising_is_an_error_unless_gpus_are_hidden_on_purpose():
    facts = machine(software=sw(cuda_available=False, cuda_error="CUDA driver initialization failed"))
    facts = dataclasses.replace(facts, inventory=Inventory((), facts.inventory.cpu))
    assert by_name(evaluate(facts), "cuda").level is Level.ERROR
    hidden = dataclasses.replace(facts, env={"CUDA_VISIBLE_DEVICES": ""})
    assert by_name(evaluate(hidden), "cuda").level is Level.WARN


def test_unified_memory_gpu_budget_uses_the_fraction():
    gb10 = GpuInfo("cuda:0", "NVIDIA GB10", 120 * GiB, 110 * GiB, (12, 1), unified=True)
    inv = Inventory((gb10,), CpuInfo(128 * GiB, 110 * GiB))
    default = by_name(evaluate(machine(inventory=inv)), "cuda:0").message
    assert "unified memory" in default and "0.75 x RAM" in default and "mapper budget 96.0 GiB" in default
    half = machine(inventory=inv, env={"SPILLOVER_IGPU_MEMORY_FRACTION": "0.5"})
    message = by_name(evaluate(half), "cuda:0").message
    assert "0.5 x RAM" in message and "mapper budget 64.0 GiB" in message
    assert "SPILLOVER_IGPU_MEMORY_FRACTION=0.5" in message


def test_bad_igpu_fraction_is_an_error():
    checks = evaluate(machine(env={"SPILLOVER_IGPU_MEMORY_FRACTION": "1.5"}))
    assert by_name(checks, "igpu-fraction").level is Level.ERROR


def test_multi_gpu_without_peer_access_warns_and_is_honest_about_tp():
    inv = Inventory((h100(0), h100(1)), CpuInfo(256 * GiB, 250 * GiB))
    peer = {(0, 1): False, (1, 0): False}
    checks = evaluate(machine(inventory=inv, peer_access=peer, nccl_available=True))
    p2p = by_name(checks, "peer-access")
    assert p2p.level is Level.WARN and "cuda:0<->cuda:1" in p2p.message and p2p.hint
    assert by_name(checks, "nccl").level is Level.PASS
    tp = by_name(checks, "parallelism").message
    assert "tensor parallelism over the 2 GPUs by default" in tp and "SPILLOVER_NO_NCCL=1" in tp
    off = evaluate(machine(inventory=inv, nccl_available=True, env={"SPILLOVER_NO_NCCL": "1"}))
    assert "tensor parallelism off" in by_name(off, "parallelism").message
    with_p2p = evaluate(
        machine(inventory=inv, peer_access={(0, 1): True, (1, 0): True}, nccl_available=False)
    )
    assert by_name(with_p2p, "peer-access").level is Level.PASS
    assert by_name(with_p2p, "nccl").level is Level.WARN
    assert by_name(with_p2p, "parallelism").level is Level.WARN  # no NCCL: layers are split


TOPO = (
    "\x1b[4mGPU0\tGPU1\tGPU2\tCPU Affinity\tNUMA Affinity\x1b[0m\n"
    "GPU0\t X \tNV18\tSYS\t0-63\t0\nGPU1\tNV18\t X \tPIX\t0-63\t0\nGPU2\tSYS\tPIX\t X \t64-127\t1\n\n"
    "Legend:\n  X    = Self\n  NV#  = Connection traversing a bonded set of # NVLinks\n"
)


def test_gpu_links_from_nvidia_smi_topo():
    from spillover.diagnostics.probe import parse_topology

    links = parse_topology(TOPO)
    assert (
        links[(0, 1)] == "NV18"
        and links[(1, 0)] == "NV18"
        and links[(0, 2)] == "SYS"
        and links[(1, 2)] == "PIX"
    )
    inv = Inventory((h100(0), h100(1), h100(2)), CpuInfo(256 * GiB, 250 * GiB))
    check = by_name(evaluate(machine(inventory=inv, nccl_available=True, gpu_links=links)), "gpu-links")
    assert (
        check.level is Level.WARN
        and "cuda:0<->cuda:1 NV18" in check.message
        and "cuda:0<->cuda:2 SYS" in check.message
    )
    nv = {k: v for k, v in links.items() if v == "NV18"}
    assert (
        by_name(evaluate(machine(inventory=inv, nccl_available=True, gpu_links=nv)), "gpu-links").level
        is Level.PASS
    )


def test_gpu_taken_by_other_processes_warns():
    checks = evaluate(machine(inventory=Inventory((h100(free=30 * GiB),), CpuInfo(128 * GiB, 120 * GiB))))
    assert by_name(checks, "cuda:0 in use").level is Level.WARN


def test_old_gpu_without_kernels_or_bf16():
    t4 = GpuInfo("cuda:0", "Tesla T4", 15 * GiB, 14 * GiB, (7, 5), supports_bf16=False)
    p100 = GpuInfo("cuda:1", "Tesla P100", 16 * GiB, 15 * GiB, (6, 0), supports_bf16=False)
    arch = sw(cuda_arch_list=("sm_75", "sm_80", "sm_90"))
    facts = machine(
        software=arch, inventory=Inventory((t4, p100), CpuInfo(64 * GiB, 60 * GiB)), nccl_available=True
    )
    checks = evaluate(facts)
    assert by_name(checks, "cuda:0 dtype").level is Level.WARN
    assert "no flash attention" in by_name(checks, "cuda:0 attention").message
    assert by_name(checks, "cuda:1 kernels").level is Level.ERROR
    assert "cuda:0 kernels" not in [c.name for c in checks]  # torch ships sm_75


def test_arch_support():
    assert arch_supported((8, 6), ("sm_80",))  # same major, higher minor: binary compatible
    assert not arch_supported((7, 5), ("sm_80", "sm_90"))
    assert arch_supported((12, 1), ("sm_90", "compute_120"))  # PTX JIT
    assert not arch_supported((9, 0), ("compute_120",))


def test_cpu_without_avx2_warns():
    cpu = CpuFacts("Old Atom", "x86_64", 4, flags=frozenset({"sse4_2"}))
    assert by_name(evaluate(machine(cpu=cpu)), "cpu-vector").level is Level.WARN


def test_low_disk_warns():
    hf = dataclasses.replace(machine().hf, free_bytes=3 * GiB)
    disk = by_name(evaluate(machine(hf=hf)), "disk")
    assert disk.level is Level.WARN and disk.hint


def test_unwritable_hf_cache():
    hf = dataclasses.replace(machine().hf, writable=False)
    assert by_name(evaluate(machine(hf=hf)), "hf-cache-writable").level is Level.ERROR
    offline = dataclasses.replace(hf, offline=True, offline_raw="1")
    assert by_name(evaluate(machine(hf=offline)), "hf-cache-writable").level is Level.WARN


def test_offline_flag_is_reported():
    hf = dataclasses.replace(machine().hf, offline=True, offline_raw="1")
    check = by_name(evaluate(machine(hf=hf)), "hf-offline")
    assert check.level is Level.WARN and "HF_HUB_OFFLINE=1" in check.message


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b")
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return open_source(str(d))


def plan_on(source, gpus: list[int], cpu: int):
    inv = hypothetical_inventory(gpus, cpu)
    return plan_for_source(source, AutoDeviceMapParams(), dtype="bf16", inventory=inv)


def test_model_that_fits_passes(llama8b):
    plan = plan_on(llama8b, [80 * GiB], 64 * GiB)
    check = by_name(evaluate(machine(model=ModelFacts("llama8b", plan=plan))), "model")
    assert check.level is Level.PASS and "fits" in check.message


def test_model_that_does_not_fit_is_an_error(llama8b):
    plan = plan_on(llama8b, [4 * GiB], 4 * GiB)
    checks = evaluate(machine(model=ModelFacts("llama8b", plan=plan)))
    check = by_name(checks, "model")
    assert check.level is Level.ERROR and "does not fit" in check.message and check.hint
    assert exit_code(checks) == 1


def test_unreadable_model_is_an_error():
    check = by_name(evaluate(machine(model=ModelFacts("nope", error="model path not found: nope"))), "model")
    assert check.level is Level.ERROR and "not found" in check.message


def test_no_model_says_which_default_would_be_used():
    message = by_name(
        evaluate(machine(model=ModelFacts(None, default_path="/x/SmolLM2.gguf"))), "model"
    ).message
    assert "SmolLM2-135M-Instruct" in message and "/x/SmolLM2.gguf" in message
