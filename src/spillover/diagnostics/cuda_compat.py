"""Which NVIDIA driver a CUDA build of torch needs (Linux x86_64 figures; Windows drivers number differently).

Two documented floors, both from NVIDIA:
- the minimum driver of a CUDA *major* release, below which a build from that family cannot start
  ("CUDA Minor Version Compatibility", docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html,
  Table 1: 11.x >= 450.80.02, 12.x >= 525.60.13, 13.x >= 580);
- the driver each toolkit *major.minor* shipped with ("CUDA Toolkit Release Notes", Table 3 "CUDA Toolkit and
  Corresponding Driver Versions", docs.nvidia.com/cuda/cuda-toolkit-release-notes/). Between the two floors a
  build runs through minor version compatibility, without PTX JIT and some newer features.
"""

from __future__ import annotations

MIN_DRIVER_FOR_MAJOR: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

TOOLKIT_DRIVER: dict[tuple[int, int], str] = {
    (11, 8): "520.61.05",
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
}


def parse_version(text: str) -> tuple[int, ...]:
    """'570.124.06' -> (570, 124, 6); '12.8' -> (12, 8). Non-numeric parts end the version."""
    parts = []
    for piece in text.strip().split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def major_minimum(cuda: str) -> str | None:
    """The oldest driver any build of this CUDA major release runs on, or None when not in the table."""
    v = parse_version(cuda)
    return MIN_DRIVER_FOR_MAJOR.get(v[0]) if v else None


def toolkit_minimum(cuda: str) -> str | None:
    """The driver shipped with this CUDA major.minor (or the nearest older minor of the same major in the
    table), or None."""
    v = parse_version(cuda)
    if len(v) < 2:
        return None
    older = [k for k in TOOLKIT_DRIVER if k[0] == v[0] and k[1] <= v[1]]
    return TOOLKIT_DRIVER[max(older)] if older else None


def driver_at_least(driver: str, minimum: str) -> bool:
    return parse_version(driver) >= parse_version(minimum)


def wheel_for_driver(driver: str | None) -> str | None:
    """The PyTorch CUDA wheel index suffix to install for this driver ("cu128"), or None when the driver is
    too old for any current build."""
    if driver is None:
        return "cu128"
    if driver_at_least(driver, MIN_DRIVER_FOR_MAJOR[13]):
        return "cu130"
    if driver_at_least(driver, MIN_DRIVER_FOR_MAJOR[12]):
        return "cu128"
    return None
