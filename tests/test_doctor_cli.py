"""`spillover doctor` run for real on this (CPU) machine, through spillover.cli.main.main."""

from __future__ import annotations

import json
import time

import pytest

from spillover import calibration
from spillover.cli.main import main


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private HF cache and calibration cache, so the report does not depend on this user's settings."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("SPILLOVER_CACHE_DIR", str(tmp_path / "cache"))
    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "SPILLOVER_IGPU_MEMORY_FRACTION", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_doctor_text(capsys):
    rc = main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for name in (
        "os",
        "python",
        "spillover",
        "torch",
        "cpu",
        "cpu-vector",
        "ram",
        "hf-cache",
        "disk",
        "model",
    ):
        assert f"  {name} " in out
    assert "SmolLM2-135M-Instruct" in out and "error(s)" in out


def test_doctor_json(capsys):
    rc = main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert doc["summary"]["error"] == 0
    for check in doc["checks"]:
        assert set(check) == {"level", "name", "message", "hint"} and check["level"] in (
            "PASS",
            "WARN",
            "ERROR",
        )
    facts = doc["facts"]
    assert facts["software"]["torch"] and facts["cpu"]["logical_cores"] >= 1
    assert facts["hf_cache"]["source"] == "HF_HOME" and facts["model"]["plan"] is None


def test_doctor_with_model(capsys, smollm2):
    rc = main(["doctor", "-m", smollm2, "--max-seq-len", "2048"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fits" in out and "verdict:" in out and "headroom" in out  # the plan table follows the checks


def test_doctor_model_that_does_not_fit(capsys, smollm2):
    rc = main(["doctor", "-m", smollm2, "--max-memory", "cpu=64MiB", "--json"])
    doc = json.loads(capsys.readouterr().out)
    model = next(c for c in doc["checks"] if c["name"] == "model")
    assert rc == 1 and model["level"] == "ERROR" and model["hint"]
    assert doc["facts"]["model"]["plan"]["fits"] is False


def test_doctor_bench_caches_a_calibration(capsys, monkeypatch, isolated):
    monkeypatch.setattr(calibration, "GEMV_MAX_BYTES", 64 << 20)  # quick on a 2-core machine
    monkeypatch.setattr(calibration, "GEMV_MIN_BYTES", 64 << 20)
    start = time.perf_counter()
    rc = main(["doctor", "--bench"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert rc == 0 and "CPU GEMV bf16" in out and "measured now" in out
    assert elapsed < 5
    assert (isolated / "cache" / "calibration.json").is_file()
    cal = calibration.load()
    assert (
        cal is not None and cal.device_name == "cpu" and cal.pinned_h2d_gbps is None and cal.cpu_gemv_gbps > 0
    )
    main(["doctor"])  # the next report shows the cached figures
    assert "cached, measured" in capsys.readouterr().out


def test_hf_cache_location_follows_huggingface_hub_order():
    from spillover.diagnostics.probe import hf_cache_location

    assert hf_cache_location({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == ("/a", "HF_HUB_CACHE")
    assert hf_cache_location({"HF_HOME": "/b"}) == ("/b/hub", "HF_HOME")
    assert hf_cache_location({"XDG_CACHE_HOME": "/c"}) == ("/c/huggingface/hub", "XDG_CACHE_HOME")
    assert hf_cache_location({})[1] == "default"
