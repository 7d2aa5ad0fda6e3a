"""calibration.py: the on-disk cache (keyed by machine) and a quick CPU-only measurement."""

from __future__ import annotations

import dataclasses
import json

from spillover import calibration
from spillover.calibration import Calibration


def fake(device: str = "NVIDIA H100 80GB HBM3", threads: int = 16) -> Calibration:
    return Calibration(
        pinned_h2d_gbps=54.7, pageable_h2d_gbps=7.4, gpu_mem_gbps=3019.0, cpu_gemv_gbps=38.8,
        cpu_threads=threads, device_name=device, torch_version="2.13.0", measured_at="2026-01-01T00:00:00+00:00",
        cpu_model="AMD EPYC 9454", cpu_gemv_fp32_gbps=70.4,
    )  # fmt: skip


def test_cache_path_honours_the_env(tmp_path):
    assert calibration.cache_path({"SPILLOVER_CACHE_DIR": str(tmp_path)}) == tmp_path / "calibration.json"
    assert calibration.cache_path({}).parts[-3:] == (".cache", "spillover", "calibration.json")


def test_save_and_load_by_machine_key(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    a, b = fake(), fake(threads=8)
    calibration.save(a, path)
    calibration.save(b, path)  # another machine (thread count) is kept beside the first
    assert calibration.load(a.machine_key, path) == a
    assert calibration.load(b.machine_key, path) == b
    assert calibration.load("other GPU|other CPU|4", path) is None
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_unreadable_or_foreign_cache_is_ignored(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text("{not json")
    assert calibration.load("k", path) is None
    path.write_text(json.dumps({"version": 99, "entries": {}}))
    assert calibration.load("k", path) is None
    calibration.save(fake(), path)  # overwrites the unusable file
    assert calibration.load(fake().machine_key, path) == fake()


def test_dtype_figure():
    cal = fake()
    assert cal.cpu_gemv_gbps_for("bf16") == 38.8 and cal.cpu_gemv_gbps_for("f32") == 70.4
    assert dataclasses.replace(cal, cpu_gemv_fp32_gbps=None).cpu_gemv_gbps_for("f32") == 38.8


def test_gemv_size_streams_from_dram():
    mib = 1 << 20
    assert calibration.gemv_bytes(None) == 256 * mib
    assert calibration.gemv_bytes(200 * mib) == 400 * mib
    assert calibration.gemv_bytes(2048 * mib) == 512 * mib


def test_measure_on_cpu_is_cpu_only():
    cal = calibration.measure("cpu", cpu_bytes=16 << 20)
    assert cal.pinned_h2d_gbps is None and cal.pageable_h2d_gbps is None and cal.gpu_mem_gbps is None
    assert cal.cpu_gemv_gbps > 0 and cal.cpu_gemv_fp32_gbps and cal.device_name == "cpu"


def test_the_cost_model_takes_the_measured_gemv_and_never_a_host_bandwidth_below_it():
    """A GEMV that streams weights at the memory roofline bounds the host's read bandwidth from below: the
    C GEMV measured 114-134 GB/s on the H200 host, above the H100 default of 66.6 that copies and CPU compute
    share."""
    from spillover.placement.cost_model import Bandwidths

    fast = Bandwidths.from_calibration(dataclasses.replace(fake(), cpu_gemv_gbps=120.0))
    assert fast.cpu_gemv_gbps == 120.0 and fast.host_mem_gbps == 120.0
    slow = Bandwidths.from_calibration(dataclasses.replace(fake(), cpu_gemv_gbps=30.0))
    assert slow.cpu_gemv_gbps == 30.0 and slow.host_mem_gbps == Bandwidths().host_mem_gbps
