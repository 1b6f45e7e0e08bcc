import builtins
import sys

import pytest
from tokenfleet.config import ConfigError
from tokenfleet.measure import device


def test_cpu_detected_without_gpu(monkeypatch):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    info = device.detect()
    assert info.kind == "cpu"
    assert info.compute_units and info.compute_units >= 1
    assert info.threads and info.threads >= 1
    assert info.torch_version
    assert info.nvml == {} and info.nvml_error


def test_override_env_and_unknown_device(monkeypatch):
    monkeypatch.setenv("TOKENFLEET_DEVICE", "cpu")
    assert device.pick() == "cpu"
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        device.pick("tpu")


def test_cuda_asked_without_gpu(monkeypatch):
    monkeypatch.setattr(device.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        device.pick("cuda")


def test_nvml_absent_is_recorded_not_raised(monkeypatch):
    real_import = builtins.__import__

    def no_pynvml(name, *a, **k):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    fields, why = device.read_nvml(0)
    assert fields == {}
    assert "pynvml not importable" in why


def test_nvml_without_driver_is_recorded():
    pytest.importorskip("pynvml")
    fields, why = device.read_nvml(0)
    if not device.torch.cuda.is_available():
        assert why  # no NVIDIA driver on this machine: the reason is kept
    else:
        assert fields.get("uuid")


def test_datasheet_mapping():
    from tokenfleet.hardware import match_device

    assert match_device("NVIDIA H100 80GB HBM3").id == "h100-sxm"
    assert match_device("NVIDIA H100 PCIe").id == "h100-pcie"
    assert match_device("NVIDIA H200").id == "h200"
    assert match_device("NVIDIA H20").id == "h20"
    assert match_device("AMD EPYC 7B13") is None
