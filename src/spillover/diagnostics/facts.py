"""What `spillover doctor` knows about the machine: plain dataclasses, filled by `probe.py`, read by `checks.py`.

Tests build these directly (a machine with an old driver, a unified-memory GPU, a full disk) and hand them to
`checks.evaluate`; nothing here touches the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spillover.calibration import Calibration
from spillover.placement.inventory import Inventory
from spillover.placement.planner import Plan


@dataclass(frozen=True)
class SoftwareFacts:
    os: str  # "Linux 6.8.0 (x86_64), Ubuntu 24.04 LTS"
    python: str
    spillover: str
    torch: str | None  # None: torch is not importable
    torch_cuda: str | None = None  # CUDA version torch was built with ("12.8"); None for CPU/ROCm builds
    torch_hip: str | None = None  # ROCm version of a ROCm build
    driver_version: str | None = None  # NVIDIA driver ("570.124.06")
    driver_cuda: str | None = None  # newest CUDA the driver supports ("12.8"), from cudaDriverGetVersion
    nvidia_gpu_present: bool = False  # kernel module / device node / nvidia-smi -L, independent of torch
    cuda_available: bool = False  # torch.cuda.is_available()
    cuda_error: str | None = None  # what torch said when CUDA did not initialise
    cuda_arch_list: tuple[str, ...] = ()  # torch.cuda.get_arch_list(): ("sm_80", "sm_90", "compute_90")


@dataclass(frozen=True)
class CpuFacts:
    model: str
    arch: str  # platform.machine(): x86_64, aarch64, arm64
    logical_cores: int
    physical_cores: int | None = None
    usable_cores: int | None = None  # CPU affinity of this process (containers, taskset)
    torch_threads: int | None = None
    flags: frozenset[str] = frozenset()  # lower-case CPU feature flags as the OS names them
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(): "AVX512", "AVX2", ...


@dataclass(frozen=True)
class HfCacheFacts:
    path: str
    source: str  # which setting chose the path: HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME or default
    exists: bool
    writable: bool  # the directory, or the nearest existing parent that would hold it
    free_bytes: int | None
    offline: bool
    offline_raw: str | None = None  # HF_HUB_OFFLINE as set


@dataclass(frozen=True)
class AppleFacts:
    mps_built: bool
    mps_available: bool
    wired_limit_mb: int | None  # iogpu.wired_limit_mb; 0 = the macOS default


@dataclass(frozen=True)
class ModelFacts:
    requested: str | None  # -m as given; None: no model asked for
    plan: Plan | None = None
    error: str | None = None  # the model could not be opened or planned
    error_in_settings: bool = False  # the error is about a flag or environment variable, not the model
    default_path: str | None = None  # the packaged SmolLM2 GGUF, when installed
    default_error: str | None = None


@dataclass(frozen=True)
class Facts:
    software: SoftwareFacts
    cpu: CpuFacts
    inventory: Inventory
    hf: HfCacheFacts
    env: dict[str, str] = field(default_factory=dict)  # the SPILLOVER_*, CUDA_VISIBLE_DEVICES, HF_* settings
    nccl_available: bool | None = None
    peer_access: dict[tuple[int, int], bool] = field(default_factory=dict)  # (i, j): i can read j's memory
    gpu_links: dict[tuple[int, int], str] = field(
        default_factory=dict
    )  # `nvidia-smi topo -m`: NV18, PIX, SYS
    apple: AppleFacts | None = None  # only on macOS
    model: ModelFacts | None = None
    calibration: Calibration | None = None  # cached for this machine, or just measured by --bench
    bench_ran: bool = False
