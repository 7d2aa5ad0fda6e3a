"""What devices exist and how much memory they have: real probes and hypothetical machines.

Probing is kept apart from decisions: `probe_inventory()` reads the hardware (torch imported lazily, inside
the functions, and only where a GPU driver is installed: `spillover plan` on a CPU machine imports no torch),
`hypothetical_inventory()` builds the same dataclasses from `--gpu/--cpu/--unified`, and the planner only ever
sees the dataclasses. Tests fake hardware by building an `Inventory` directly.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from spillover.errors import ConfigError

log = logging.getLogger(__name__)

IGPU_FRACTION_ENV = "SPILLOVER_IGPU_MEMORY_FRACTION"
DEFAULT_IGPU_MEMORY_FRACTION = 0.75
"""Share of system RAM a unified-memory GPU may use by default. The OS, the desktop and the engine's own
process (tokenizer, Python, CPU-offloaded parts) need the rest; 0.75 also matches what macOS grants the GPU
by default (recommendedMaxWorkingSetSize is about 2/3 to 3/4 of RAM)."""

UNIFIED_NAME_HINTS = ("orin", "xavier", "jetson", "tegra", "thor", "gb10")
"""CUDA devices that share system RAM even where `is_integrated` is not reported (Jetson boards, GB10/DGX
Spark). Grace Hopper (GH200) is not listed: its GPU has its own HBM, which cudaMalloc allocates from."""


@dataclass(frozen=True)
class GpuInfo:
    device: str  # "cuda:0" (index among visible devices) or "mps"
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] | None = None
    unified: bool = False  # shares system RAM with the CPU
    supports_bf16: bool = True
    context_included: bool = False  # free_bytes was read after this process created its CUDA context
    wired_limit_bytes: int | None = None  # macOS iogpu.wired_limit_mb, when set

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]


@dataclass(frozen=True)
class CpuInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GpuInfo, ...]
    cpu: CpuInfo
    hypothetical: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def unified(self) -> bool:
        return any(g.unified for g in self.gpus)

    @property
    def cuda_bf16(self) -> bool:
        """A CUDA GPU that supports bf16 is present (decides the auto dtype)."""
        return any(g.kind == "cuda" and g.supports_bf16 for g in self.gpus)

    @property
    def num_cuda(self) -> int:
        return sum(g.kind == "cuda" for g in self.gpus)


def igpu_memory_fraction(environ: Mapping[str, str] | None = None) -> float:
    """SPILLOVER_IGPU_MEMORY_FRACTION, validated: a number in (0, 1]; default 0.75."""
    env = os.environ if environ is None else environ
    raw = env.get(IGPU_FRACTION_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_IGPU_MEMORY_FRACTION
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{IGPU_FRACTION_ENV} must be a number in (0, 1], got {raw!r}") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{IGPU_FRACTION_ENV} must be a number in (0, 1], got {raw!r}")
    return value


def is_unified_cuda(name: str, is_integrated: bool) -> bool:
    """Unified memory: the driver says the GPU is integrated, or it is a known shared-RAM board."""
    return is_integrated or any(h in name.lower() for h in UNIFIED_NAME_HINTS)


# ------------------------------------------------------------------ real hardware


def probe_cpu() -> CpuInfo:
    import psutil

    vm = psutil.virtual_memory()
    return CpuInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))


def gpu_driver_installed() -> bool:
    """Whether torch.cuda could find a device here: NVIDIA's kernel driver (/proc/driver/nvidia, /dev/nvidiactl)
    or its user-space library (libcuda, which torch loads), or ROCm's /dev/kfd. Without any of them probing
    needs no torch (1-2 s of import)."""
    if any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")):
        return True
    for name in ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def probe_cuda() -> list[GpuInfo]:
    """Visible CUDA devices (CUDA_VISIBLE_DEVICES is applied by the driver: index i is the i-th visible one)."""
    if not gpu_driver_installed():
        return []
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)  # creates this process's context first
        cc = (int(props.major), int(props.minor))
        gpus.append(
            GpuInfo(
                device=f"cuda:{i}",
                name=str(props.name),
                total_bytes=int(total),
                free_bytes=int(free),
                compute_capability=cc,
                unified=is_unified_cuda(str(props.name), bool(getattr(props, "is_integrated", False))),
                supports_bf16=cc >= (8, 0),
                context_included=True,
            )
        )
    return gpus


def read_wired_limit_bytes() -> int | None:
    """macOS `sysctl iogpu.wired_limit_mb` (0 or absent = the OS default) -> bytes, or None."""
    try:
        out = subprocess.run(
            ["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=5
        )
        mb = int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return mb * (1 << 20) if mb > 0 else None


def probe_mps(cpu: CpuInfo) -> list[GpuInfo]:
    """Apple Silicon GPU: unified memory; total = system RAM, the budget is decided by the planner."""
    if platform.system() != "Darwin":
        return []
    try:
        import torch
    except ImportError:  # pragma: no cover
        return []
    if not torch.backends.mps.is_available():
        return []
    return [
        GpuInfo(
            device="mps",
            name="Apple GPU (MPS)",
            total_bytes=cpu.total_bytes,
            free_bytes=cpu.available_bytes,
            unified=True,
            supports_bf16=False,
            context_included=True,
            wired_limit_bytes=read_wired_limit_bytes(),
        )
    ]


def probe_inventory() -> Inventory:
    """The devices of this machine, as this process sees them."""
    cpu = probe_cpu()
    gpus = probe_cuda() or probe_mps(cpu)
    return Inventory(gpus=tuple(gpus), cpu=cpu)


# ------------------------------------------------------------------ hypothetical hardware


def hypothetical_inventory(gpus: list[int], cpu: int | None = None, unified: bool = False) -> Inventory:
    """A made-up machine for `spillover plan --gpu 24GiB --gpu 24GiB --cpu 64GiB [--unified]`.

    gpus: memory of each GPU, in ordinal order. cpu: memory available to spillover (default: this machine's
    available RAM). unified: the GPUs share the CPU's RAM (`--cpu` is then the system RAM, and the GPU budget
    is capped to SPILLOVER_IGPU_MEMORY_FRACTION of it; with no --gpu, one unified GPU of that size).
    """
    notes: list[str] = ["hypothetical hardware"]
    if cpu is None:
        real = probe_cpu()
        cpu_info = CpuInfo(real.total_bytes if unified else real.available_bytes, real.available_bytes)
        notes.append("CPU memory: this machine's (no --cpu given)")
    else:
        cpu_info = CpuInfo(cpu, cpu)
    sizes = list(gpus) or ([cpu_info.total_bytes] if unified else [])
    infos = tuple(
        GpuInfo(device=f"cuda:{i}", name="hypothetical GPU", total_bytes=s, free_bytes=s, unified=unified)
        for i, s in enumerate(sizes)
    )
    return Inventory(gpus=infos, cpu=cpu_info, hypothetical=True, notes=tuple(notes))


# ------------------------------------------------------------------ driver, CPU name and interconnect
# Added for `spillover doctor` and the calibration cache; nothing in the planner depends on these.


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU and driver are on this machine, whatever torch was built with (kernel module, device
    node, WSL's nvidia-smi)."""
    if os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0"):
        return True
    return bool(_nvidia_smi(["-L"]).strip())


def read_nvidia_driver_version() -> str | None:
    """The NVIDIA driver version ("535.104.05"): nvidia-smi, else the kernel module, else pynvml; or None."""
    out = _nvidia_smi(["--query-gpu=driver_version", "--format=csv,noheader"]).strip()
    if out:
        return out.splitlines()[0].strip()
    try:
        with open("/proc/driver/nvidia/version") as f:
            text = f.read()
    except OSError:
        text = ""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return m.group(1) if m else _nvml_driver_version()


def _nvidia_smi(args: list[str]) -> str:
    try:
        out = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def _nvml_driver_version() -> str | None:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception:  # not installed, or no driver: either way we cannot tell
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def probe_peer_access(num_gpus: int) -> dict[tuple[int, int], bool]:
    """Whether CUDA device i can read device j's memory directly (P2P over NVLink/PCIe), for every i != j."""
    if num_gpus < 2:
        return {}
    import torch

    return {
        (i, j): bool(torch.cuda.can_device_access_peer(i, j))
        for i in range(num_gpus)
        for j in range(num_gpus)
        if i != j
    }


def cpu_model_name() -> str:
    """The CPU's marketing name ("AMD EPYC 9654 96-Core Processor", "Apple M2 Max"), best effort."""
    if platform.system() == "Darwin":
        out = _sysctl("machdep.cpu.brand_string")
        if out:
            return out
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _sysctl(name: str) -> str:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
