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


# ---- NVML found by UUID or PCI bus id, never by CUDA's index (a fake pynvml) -----------------------------------


def test_nvml_follows_a_remapped_cuda_visible_devices(monkeypatch):
    import fake_nvml

    # CUDA_VISIBLE_DEVICES=3: CUDA's device 0 is NVML's device 3. torch reports the UUID without NVML's prefix.
    state = fake_nvml.install(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(device, "cuda_identity", lambda i: {"uuid": fake_nvml.uuid(3)[4:], "pci_bus_id": "x"})
    fields, why = device.read_nvml(0)
    assert why is None and fields["uuid"] == fake_nvml.uuid(3) and fields["nvml_lookup"] == "uuid"
    assert ("index", 0) not in state.calls
    assert device.telemetry(0)["power_w"] == 503.0  # device 3's reading, not device 0's
    with device.nvml_poller(0, interval_s=0.001) as p:
        pass
    assert all(poll["power_w"] == 503.0 for poll in p.polls)
    state.energy_mj[3], state.energy_mj[0] = 12_345.0, 1.0
    read, why = device.energy_counter(0)
    assert why is None and read() == 12.345  # joules


def test_nvml_by_pci_bus_id_then_by_index_only_without_an_identity(monkeypatch):
    import fake_nvml

    fake_nvml.install(monkeypatch)
    monkeypatch.setattr(device, "cuda_identity", lambda i: {"pci_bus_id": fake_nvml.bus(2)})
    fields, _ = device.read_nvml(0)
    assert fields["uuid"] == fake_nvml.uuid(2) and fields["nvml_lookup"] == "pci_bus_id"
    monkeypatch.setattr(device, "cuda_identity", lambda i: {})  # an old torch: no UUID, no bus id
    fields, _ = device.read_nvml(1)
    assert fields["uuid"] == fake_nvml.uuid(1) and fields["nvml_lookup"] == "index (unverified)"
    # torch names a device NVML does not have, under a remapped CUDA_VISIBLE_DEVICES: no fields from another GPU,
    # and the reason kept (unmapped, NVML's index is the best guess left, and says so)
    monkeypatch.setattr(device, "cuda_identity", lambda i: {"uuid": "ffffffff-0000"})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device.read_nvml(0)[0]["nvml_lookup"] == "index (unverified): no UUID or bus id matched"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    fields, why = device.read_nvml(0)
    assert "uuid" not in fields and "no device matching CUDA device 0" in why
    read, why = device.energy_counter(0)
    assert read is None and "no device matching" in why
    assert device.nvml_poller(0).read is None


def test_cuda_identity_formats_torchs_pci_fields(monkeypatch):
    import types

    props = types.SimpleNamespace(uuid="abcd-ef", pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)
    monkeypatch.setattr(device.torch.cuda, "get_device_properties", lambda i: props)
    assert device.cuda_identity(0) == {"uuid": "abcd-ef", "pci_bus_id": "00000000:3B:00.0"}
    monkeypatch.setattr(device.torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace())
    assert device.cuda_identity(0) == {}
