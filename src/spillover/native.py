"""Small C kernels compiled on first use: `build(source)` -> a ctypes library, or None where it cannot be.

The source is compiled with the system C compiler (`cc -O3 -march=native -fopenmp`, about a second) into
`~/.cache/spillover/kernels/` (`$SPILLOVER_CACHE`), keyed by the source, the flags, the compiler and the CPU,
and loaded with ctypes after torch, so it shares torch's OpenMP runtime. Without a compiler, off Linux, or with
`SPILLOVER_CPU_KERNELS=0`, `build` returns None and the callers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")


def cache_dir() -> Path:
    base = os.environ.get("SPILLOVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spillover"
    )
    return Path(base) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "".join(ln for ln in f if ln.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.processor()


def compiled(source: Path, flags: tuple[str, ...] = FLAGS) -> Path | None:
    """The shared library of `source` (compiled once per source, flags, compiler and CPU), not loaded; None
    where it cannot be built. The planner asks this much without torch (`placement/resolve.gguf_keep`)."""
    if os.environ.get("SPILLOVER_CPU_KERNELS", "1") == "0" or platform.system() != "Linux":
        return None
    src = source.read_bytes()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), str(cc).encode(), _cpu_id().encode()]))
    path = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not path.exists():
        if cc is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            subprocess.run([cc, str(source), *flags, "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)  # atomic: concurrent first uses each build, one wins
        except (OSError, subprocess.SubprocessError):
            return None
    return path


def build(source: Path, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """Compile `source` (once per source, flags, compiler and CPU) and load it; None where that fails."""
    path = compiled(source, flags)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None
