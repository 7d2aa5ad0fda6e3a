"""Reading the machine for `spillover doctor`: everything here touches the OS, torch or the disk.

`probe_facts()` returns a `Facts`; the decisions live in `checks.py`. Each probe is defensive: a tool that
is missing or fails yields "unknown" (None), never an exception, so the doctor always reports.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

from spillover import __version__, calibration
from spillover.diagnostics.facts import AppleFacts, CpuFacts, Facts, HfCacheFacts, ModelFacts, SoftwareFacts
from spillover.placement.inventory import (
    Inventory,
    _nvidia_smi,
    cpu_model_name,
    nvidia_gpu_present,
    probe_inventory,
    probe_peer_access,
    read_nvidia_driver_version,
)

log = logging.getLogger(__name__)

ENV_KEYS = (
    "SPILLOVER_IGPU_MEMORY_FRACTION",
    "SPILLOVER_NO_NCCL",
    "SPILLOVER_CACHE_DIR",
    "CUDA_VISIBLE_DEVICES",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "OMP_NUM_THREADS",
)
TRUTHY = ("1", "on", "yes", "true")


def probe_facts(environ: Mapping[str, str] | None = None) -> Facts:
    """Everything the checks need about this machine (the model and the bench are added by the caller)."""
    env = dict(os.environ if environ is None else environ)
    software = probe_software()
    inventory = probe_inventory()
    return Facts(
        software=software,
        cpu=probe_cpu_facts(),
        inventory=inventory,
        hf=probe_hf_cache(env),
        env={k: env[k] for k in ENV_KEYS if k in env},
        nccl_available=probe_nccl() if inventory.num_cuda > 1 else None,
        peer_access=safe_peer_access(inventory),
        gpu_links=parse_topology(_nvidia_smi(["topo", "-m"])) if inventory.num_cuda > 1 else {},
        apple=probe_apple() if platform.system() == "Darwin" else None,
        model=ModelFacts(requested=None, **probe_default_model()),
        calibration=safe_load_calibration(),
    )


# ------------------------------------------------------------------ software


def os_description() -> str:
    base = f"{platform.system()} {platform.release()} ({platform.machine()})"
    if platform.system() == "Darwin":
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{base}, {line.split('=', 1)[1].strip(chr(34))}"
    except OSError:
        pass
    return base


def probe_software() -> SoftwareFacts:
    python = f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"
    common = dict(os=os_description(), python=python, spillover=__version__)
    try:
        import torch
    except ImportError:
        return SoftwareFacts(torch=None, nvidia_gpu_present=nvidia_gpu_present(), **common)
    present = nvidia_gpu_present()
    available, cuda_error = cuda_status(torch)
    return SoftwareFacts(
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        torch_hip=getattr(torch.version, "hip", None),
        driver_version=read_nvidia_driver_version() if present else None,
        driver_cuda=driver_cuda_version(torch) if present else None,
        nvidia_gpu_present=present,
        cuda_available=available,
        cuda_error=cuda_error,
        cuda_arch_list=tuple(torch.cuda.get_arch_list()) if available else (),
        **common,
    )


def cuda_status(torch) -> tuple[bool, str | None]:  # noqa: ANN001 - the torch module
    """torch.cuda.is_available(), and the warning torch gave when it is not (e.g. 'driver too old')."""
    if not torch.version.cuda:
        return False, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
    messages = [str(w.message).strip().splitlines()[0] for w in caught]
    return available, (messages[0] if messages and not available else None)


def driver_cuda_version(torch) -> str | None:  # noqa: ANN001
    """The newest CUDA version the installed driver supports ("12.8"), from cudaDriverGetVersion."""
    try:
        v = int(torch._C._cuda_getDriverVersion())
    except Exception:  # a CPU build has no such call; a broken driver raises
        return None
    return f"{v // 1000}.{v % 1000 // 10}" if v > 0 else None


# ------------------------------------------------------------------ CPU


def read_cpu_flags() -> frozenset[str]:
    """CPU feature flags, lower case, in Linux's spelling (avx2, avx512_bf16, amx_tile, asimd, bf16, ...)."""
    if platform.system() == "Darwin":
        return macos_cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return frozenset()


def macos_cpu_flags() -> frozenset[str]:
    import subprocess

    def sysctl(*names: str) -> str:
        try:
            out = subprocess.run(["sysctl", "-n", *names], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout

    if platform.machine() == "arm64":
        flags = {"asimd"}  # every Apple Silicon core has NEON
        for feat, name in (("FEAT_BF16", "bf16"), ("FEAT_I8MM", "i8mm")):
            if sysctl(f"hw.optional.arm.{feat}").strip() == "1":
                flags.add(name)
        return frozenset(flags)
    words = sysctl("machdep.cpu.features", "machdep.cpu.leaf7_features").lower().replace(".", "_").split()
    aliases = {"avx2_0": "avx2", "avx512bf16": "avx512_bf16"}
    return frozenset(aliases.get(w, w) for w in words)


def probe_cpu_facts() -> CpuFacts:
    import psutil

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = None
    try:
        import torch

        threads, capability = torch.get_num_threads(), torch.backends.cpu.get_cpu_capability()
    except Exception:
        threads, capability = None, None
    return CpuFacts(
        model=cpu_model_name(),
        arch=platform.machine(),
        logical_cores=os.cpu_count() or 1,
        physical_cores=psutil.cpu_count(logical=False),
        usable_cores=usable,
        torch_threads=threads,
        flags=read_cpu_flags(),
        torch_capability=capability,
    )


# ------------------------------------------------------------------ GPUs


def probe_nccl() -> bool:
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_nccl_available())
    except Exception:
        return False


def safe_peer_access(inventory: Inventory) -> dict[tuple[int, int], bool]:
    try:
        return probe_peer_access(inventory.num_cuda)
    except Exception as e:  # a driver error here should not stop the report
        log.warning("could not query peer access: %s", e)
        return {}


def probe_apple() -> AppleFacts:
    import subprocess

    import torch

    try:
        out = subprocess.run(
            ["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=5
        )
        wired = int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        wired = None
    return AppleFacts(
        mps_built=bool(torch.backends.mps.is_built()),
        mps_available=bool(torch.backends.mps.is_available()),
        wired_limit_mb=wired,
    )


# ------------------------------------------------------------------ Hugging Face cache


def hf_cache_location(env: Mapping[str, str]) -> tuple[str, str]:
    """Where huggingface_hub puts downloads, and which setting decided it (its own resolution order)."""
    if env.get("HF_HUB_CACHE"):
        return os.path.expanduser(env["HF_HUB_CACHE"]), "HF_HUB_CACHE"
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub"), "HF_HOME"
    if env.get("XDG_CACHE_HOME"):
        return os.path.join(env["XDG_CACHE_HOME"], "huggingface", "hub"), "XDG_CACHE_HOME"
    return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub"), "default"


def nearest_existing(path: str) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def probe_hf_cache(env: Mapping[str, str]) -> HfCacheFacts:
    path, source = hf_cache_location(env)
    anchor = nearest_existing(path)  # the cache itself, or the parent it would be created in
    try:
        free = shutil.disk_usage(anchor).free
    except OSError:
        free = None
    raw = env.get("HF_HUB_OFFLINE")
    return HfCacheFacts(
        path=path,
        source=source,
        exists=os.path.isdir(path),
        writable=os.access(anchor, os.W_OK | os.X_OK),
        free_bytes=free,
        offline=(raw or "").strip().lower() in TRUTHY,
        offline_raw=raw,
    )


# ------------------------------------------------------------------ model and calibration


def probe_default_model() -> dict[str, str | None]:
    from spillover.errors import ModelLoadError
    from spillover.loading.source import default_model_path

    try:
        return {"default_path": default_model_path(), "default_error": None}
    except ModelLoadError as e:
        return {"default_path": None, "default_error": str(e)}


def safe_load_calibration() -> calibration.Calibration | None:
    try:
        return calibration.load()
    except Exception as e:  # never let a broken cache or GPU query stop the report
        log.warning("could not read the calibration cache: %s", e)
        return None


def parse_topology(text: str) -> dict[tuple[int, int], str]:
    """`nvidia-smi topo -m` -> {(i, j): "NV18" | "PIX" | "PXB" | "PHB" | "NODE" | "SYS"} for GPU pairs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {}
    cols = [c for c in lines[0] if re.fullmatch(r"GPU\d+", c)]
    out: dict[tuple[int, int], str] = {}
    for row in lines[1:]:
        if not row or not re.fullmatch(r"GPU\d+", row[0]):
            continue
        i = int(row[0][3:])
        for c, cell in zip(cols, row[1 : 1 + len(cols)], strict=False):
            j = int(c[3:])
            if i != j and cell != "X":
                out[(i, j)] = cell
    return out
