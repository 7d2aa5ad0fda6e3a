"""Manual device maps: every accepted form, every bad form with its message, and plan rendering."""

from __future__ import annotations

import pytest

from spillover.errors import DeviceMapSyntaxError, UnknownDeviceError
from spillover.placement.device_map import DeviceMap, format_layers, parse_device_layers


def test_count_puts_layers_on_gpu0_rest_on_cpu():
    dm = parse_device_layers("16", num_layers=32, visible_gpus=1)
    assert dm.layers == ("cuda:0",) * 16 + ("cpu",) * 16
    assert dm.embed == "cuda:0" and dm.head == "cuda:0"


def test_int_spec_and_whitespace():
    assert parse_device_layers(16, 32, 1) == parse_device_layers(" 16 ", 32, 1)


def test_ordinal_pairs_string_and_sdk_list_agree():
    a = parse_device_layers("0:16;1:16", 32, 2)
    b = parse_device_layers(["0:16", "1:16"], 32, 2)
    assert a == b
    assert a.layers_on("cuda:0") == list(range(16)) and a.layers_on("cuda:1") == list(range(16, 32))
    assert a.embed == "cuda:0" and a.head == "cuda:1"


def test_layers_given_out_in_written_order():
    dm = parse_device_layers("1:4;0:2", 8, 2)
    assert dm.layers == ("cuda:1",) * 4 + ("cuda:0",) * 2 + ("cpu",) * 2
    assert dm.embed == "cuda:1"  # with layer 0
    assert dm.head == "cuda:0"  # with the last GPU layer


def test_all_layers_on_gpu_and_trailing_separator():
    dm = parse_device_layers("0:8;", 8, 1)
    assert dm.devices() == ["cuda:0"]


def test_mps_kind_names_the_device_mps():
    dm = parse_device_layers("4", 8, 1, gpu_kind="mps")
    assert dm.layers[:4] == ("mps",) * 4 and dm.head == "mps"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "device map is empty"),
        ("   ", "device map is empty"),
        ([], "device map is empty"),
        ("abc", "the layer count 'abc' is not an integer"),
        ("1.5", "the layer count '1.5' is not an integer"),
        ("0:x", "the layer count 'x' is not an integer"),
        ("a:4", "the GPU ordinal 'a' is not an integer"),
        (":4", "the GPU ordinal '' is not an integer"),
        ("0:", "the layer count '' is not an integer"),
        ("0:4:2", "is not ORDINAL:LAYERS"),
        ("0-4", "the layer count '0-4' is not an integer"),
        ("0:4;;1:4", "has an empty entry"),
        ("0:4;8", "lacks a GPU ordinal"),
        ("0", "the layer count must be positive, got 0"),
        ("-3", "the layer count must be positive, got -3"),
        ("0:0", "the layer count must be positive, got 0"),
        ("0:-2", "the layer count must be positive, got -2"),
        ("-1:4", "the GPU ordinal must be 0 or more"),
        ("0:4;0:4", "names GPU 0 twice"),
        ("40", "asks for 40 layers on GPUs but the model has only 32"),
        ("0:20;1:20", "asks for 40 layers on GPUs but the model has only 32"),
        (True, "must be a string"),
        (1.5, "must be a string"),
        (["0:4", 4], "must hold strings"),
    ],
)
def test_bad_maps_get_a_clear_syntax_error(spec, message):
    with pytest.raises(DeviceMapSyntaxError, match=None) as e:
        parse_device_layers(spec, num_layers=32, visible_gpus=2)
    assert message in str(e.value)


def test_ordinal_not_visible_names_visible_devices_and_env(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with pytest.raises(UnknownDeviceError) as e:
        parse_device_layers("0:8;2:8", 32, visible_gpus=2)
    msg = str(e.value)
    assert "GPU 2" in msg and "only 2 GPU(s) are visible: cuda:0, cuda:1" in msg
    assert "CUDA_VISIBLE_DEVICES='3,5'" in msg


def test_no_gpu_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(UnknownDeviceError, match="no GPU is visible"):
        parse_device_layers("8", 32, visible_gpus=0)


def test_errors_are_config_errors_with_exit_code_2():
    with pytest.raises(DeviceMapSyntaxError) as e:
        parse_device_layers("x", 4, 1)
    assert isinstance(e.value, ValueError) and e.value.exit_code == 2


def test_existing_devicemap_api_still_works():
    dm = DeviceMap.single("cuda:0", 3)
    assert dm.devices() == ["cuda:0"] and dm.layers_on("cuda:0") == [0, 1, 2] and dm.is_single_device()
    assert format_layers([0, 1, 2]) == "0-2" and format_layers([5]) == "5" and format_layers([]) == "-"
