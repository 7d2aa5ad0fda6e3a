"""Measured bandwidths of this machine, cached on disk for the offload cost model.

    cal = measure()        # a few seconds: host->GPU (pinned, pageable), GPU memory, CPU GEMV
    save(cal)              # $SPILLOVER_CACHE_DIR/calibration.json, or ~/.cache/spillover/calibration.json
    load()                 # the entry for this machine, or None

Entries are keyed by machine: GPU name + CPU model + CPU threads, so a cache copied between machines, or a
run with a different thread count, does not hand out another machine's figures. All rates are in GB/s
(1e9 bytes per second). `spillover doctor --bench` measures and saves.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from spillover.placement.inventory import cpu_model_name

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SPILLOVER_CACHE_DIR"
FILE_NAME = "calibration.json"
FORMAT_VERSION = 1

MiB = 1 << 20
GEMV_IN_FEATURES = 4096  # x: 1 x 4096, like a Llama-3-8B hidden state
GEMV_MIN_BYTES = 256 * MiB
GEMV_MAX_BYTES = 512 * MiB
H2D_BYTES = 256 * MiB
DEVICE_COPY_BYTES = 1024 * MiB
MIN_SECONDS = 0.25  # each measurement repeats until it has run this long (or MAX_REPS)
MIN_REPS = 3
MAX_REPS = 50


@dataclass(frozen=True)
class Calibration:
    pinned_h2d_gbps: float | None  # host->GPU copy from pinned memory; None without a GPU
    pageable_h2d_gbps: float | None  # host->GPU copy from ordinary (pageable) memory
    gpu_mem_gbps: float | None  # device-to-device copy, read + write bytes
    cpu_gemv_gbps: (
        float  # bf16 weights streamed per second by a 1 x 4096 GEMV (what offloaded bf16 layers do)
    )
    cpu_threads: int
    device_name: str  # the GPU measured ("NVIDIA H100 80GB HBM3"), or "cpu"
    torch_version: str
    measured_at: str  # ISO 8601, UTC
    cpu_model: str = ""
    cpu_gemv_fp32_gbps: float | None = None  # the same GEMV with fp32 weights

    @property
    def machine_key(self) -> str:
        return machine_key(self.device_name, self.cpu_model, self.cpu_threads)

    def cpu_gemv_gbps_for(self, dtype: str) -> float:
        """GEMV weight bandwidth for the model dtype ("f32" uses the fp32 figure when measured)."""
        if dtype in ("f32", "float32") and self.cpu_gemv_fp32_gbps is not None:
            return self.cpu_gemv_fp32_gbps
        return self.cpu_gemv_gbps


def machine_key(device_name: str, cpu_model: str, cpu_threads: int) -> str:
    return f"{device_name}|{cpu_model}|{cpu_threads}"


def cache_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    root = env.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "spillover")
    return Path(root) / FILE_NAME


def current_device() -> str:
    """The accelerator `measure()` uses by default: "cuda:0", "mps" or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return "Apple GPU (MPS)" if device == "mps" else "cpu"


def current_machine_key() -> str:
    import torch

    return machine_key(device_name(current_device()), cpu_model_name(), torch.get_num_threads())


# ------------------------------------------------------------------ the cache file


def save(cal: Calibration, path: Path | None = None) -> Path:
    """Store `cal` under its machine key (other machines' entries are kept). Returns the file written."""
    path = path or cache_path()
    doc = _read(path)
    doc["entries"][cal.machine_key] = dataclasses.asdict(cal)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    return path


def load(key: str | None = None, path: Path | None = None) -> Calibration | None:
    """The cached calibration of this machine (or of `key`), or None when there is none or it is unreadable."""
    entry = _read(path or cache_path())["entries"].get(key or current_machine_key())
    if entry is None:
        return None
    names = {f.name for f in dataclasses.fields(Calibration)}
    try:
        return Calibration(**{k: v for k, v in entry.items() if k in names})
    except TypeError as e:
        log.warning("ignoring a malformed calibration entry: %s", e)
        return None


def _read(path: Path) -> dict[str, Any]:
    empty: dict[str, Any] = {"version": FORMAT_VERSION, "entries": {}}
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable calibration cache %s: %s", path, e)
        return empty
    if (
        not isinstance(doc, dict)
        or doc.get("version") != FORMAT_VERSION
        or not isinstance(doc.get("entries"), dict)
    ):
        log.warning("ignoring calibration cache %s: unknown format", path)
        return empty
    return doc


# ------------------------------------------------------------------ measuring


def measure(device: str | None = None, cpu_bytes: int | None = None) -> Calibration:
    """Measure this machine in a few seconds. `device`: "cuda:N", "mps" or "cpu" (default: the first GPU,
    else the CPU only). `cpu_bytes`: size of the GEMV weight (default: 2 x L3, within 256-512 MiB, so it
    streams from DRAM rather than cache)."""
    import torch

    device = device or current_device()
    bf16, fp32 = cpu_gemv_gbps(cpu_bytes or gemv_bytes(l3_cache_bytes()))
    pinned = pageable = gpu_mem = None
    if device.startswith("cuda"):
        pinned, pageable = h2d_gbps(device, pinned=True), h2d_gbps(device, pinned=False)
    if device != "cpu":
        gpu_mem = device_copy_gbps(device)
    return Calibration(
        pinned_h2d_gbps=pinned,
        pageable_h2d_gbps=pageable,
        gpu_mem_gbps=gpu_mem,
        cpu_gemv_gbps=bf16,
        cpu_threads=torch.get_num_threads(),
        device_name=device_name(device),
        torch_version=torch.__version__,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        cpu_model=cpu_model_name(),
        cpu_gemv_fp32_gbps=fp32,
    )


def gemv_bytes(l3_bytes: int | None) -> int:
    """Weight size for the CPU GEMV: twice the last-level cache, at least 256 MiB, at most 512 MiB."""
    return min(GEMV_MAX_BYTES, max(GEMV_MIN_BYTES, 2 * (l3_bytes or 0)))


def l3_cache_bytes() -> int | None:
    """Size of the last-level cache (Linux sysfs), or None."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        digits = text.rstrip("KMB")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def timed(fn: Callable[[], Any], sync: Callable[[], Any] = lambda: None) -> float:
    """Seconds of the fastest call of `fn` after one warm-up call, over at least MIN_REPS calls and MIN_SECONDS.

    The fastest, not the mean: other processes only ever slow a copy down, so the minimum is the best
    estimate of what the hardware does (this matters on shared machines)."""
    fn()
    sync()
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < MIN_REPS or (time.perf_counter() - start < MIN_SECONDS and reps < MAX_REPS):
        t0 = time.perf_counter()
        fn()
        sync()  # per call: a queued GPU copy is not a finished one
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def cpu_gemv_gbps(nbytes: int) -> tuple[float, float]:
    """(bf16, fp32) weight bytes per second of y = x @ W.T, x: 1 x 4096, W: N x 4096 of `nbytes` bytes, through
    the kernel the engine uses (bf16: the C GEMV where it is compiled, else torch's linear).

    One buffer serves both dtypes (viewed as bf16, then as fp32), so the slow first touch of fresh pages is
    paid once. It is filled with bf16 values in [0.5, 1): every 16-bit half is a normal number, so the
    fp32 view holds normal numbers too (no denormal slow paths), and no page is left untouched (never
    time on zeros: untouched pages all map to one zero page and stay in cache).
    """
    import torch
    import torch.nn.functional as F

    tile = 64  # rows of random values, repeated down the matrix by one broadcast copy
    rows_bf16 = max(1, -(-nbytes // (2 * GEMV_IN_FEATURES * tile))) * tile  # a whole number of tiles (even)
    block = torch.rand(tile, GEMV_IN_FEATURES).add_(1).mul_(0.5).to(torch.bfloat16)
    buf = torch.empty(rows_bf16, GEMV_IN_FEATURES, dtype=torch.bfloat16)
    buf.view(-1, tile, GEMV_IN_FEATURES).copy_(block)
    from spillover.layers import cpu_linear

    rates = []
    for dtype in (torch.bfloat16, torch.float32):
        w = buf.view(dtype).view(-1, GEMV_IN_FEATURES)
        x = torch.rand(1, GEMV_IN_FEATURES).to(dtype)
        if cpu_linear.usable(w, 1):  # what the engine runs for CPU-computed bf16 layers (layers/cpu_gemv.c)
            fn = lambda w=w, x=x: cpu_linear.gemv_bf16(w, x)  # noqa: E731
        else:
            fn = lambda w=w, x=x: F.linear(x, w)  # noqa: E731
        with torch.inference_mode():
            seconds = timed(fn)
        rates.append(w.nbytes / seconds / 1e9)
    return rates[0], rates[1]


def h2d_gbps(device: str, pinned: bool, nbytes: int = H2D_BYTES) -> float:
    """Host-to-GPU copy bandwidth from pinned or pageable memory."""
    import torch

    host = torch.ones(nbytes, dtype=torch.uint8)
    if pinned:
        host = host.pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = timed(lambda: dev.copy_(host, non_blocking=pinned), lambda: torch.cuda.synchronize(device))
    return nbytes / seconds / 1e9


def device_copy_gbps(device: str, nbytes: int = DEVICE_COPY_BYTES) -> float:
    """GPU memory bandwidth: a device-to-device copy, counting bytes read plus bytes written."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else torch.mps.synchronize
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), sync)
    return 2 * nbytes / seconds / 1e9
