"""Accelerator datasheets: every file validates, figures are dense and sourced, and device names match one entry."""

import pytest
from tokenfleet.hardware import all_hardware, load_hardware, match_device

IDS = {"a100-sxm", "h100-sxm", "h100-pcie", "h800", "h20", "h200", "l20", "l40s", "b200", "mi300x", "ascend-910b"}

NAMES = {
    "NVIDIA H100 80GB HBM3": "h100-sxm", "NVIDIA H100 PCIe": "h100-pcie", "NVIDIA H200": "h200",
    "NVIDIA H20": "h20", "NVIDIA A100-SXM4-80GB": "a100-sxm", "NVIDIA H800": "h800", "NVIDIA L20": "l20",
    "NVIDIA L40S": "l40s", "NVIDIA B200": "b200", "AMD Instinct MI300X": "mi300x", "Ascend910B2": "ascend-910b",
}


def test_all_entries_validate():
    hw = all_hardware()
    assert IDS <= set(hw)
    assert not any(h.vendor == "cpu" for h in hw.values())


@pytest.mark.parametrize("name,expected", sorted(NAMES.items()))
def test_match_device(name, expected):
    assert match_device(name).id == expected


def test_ambiguous_names():
    hw = all_hardware()

    def matching(name):
        return {h.id for h in hw.values() if any(p.lower() in name.lower() for p in h.match)}

    # H100 SXM and PCIe never both match; "H200" contains "H20" but the longer pattern wins
    assert "h100-pcie" not in matching("NVIDIA H100 80GB HBM3")
    assert "h100-sxm" not in matching("NVIDIA H100 PCIe")
    assert matching("NVIDIA H20") == {"h20"}
    assert match_device("NVIDIA H200").id == "h200"
    assert match_device("NVIDIA A100 80GB PCIe") is None  # a different card: not the SXM datasheet
    assert match_device("NVIDIA GeForce RTX 4090") is None


def test_dense_not_sparse():
    h100 = load_hardware("h100-sxm")
    assert h100.peak_tflops["bf16"] == 989 and h100.peak_tflops["fp8"] == 1979
    assert load_hardware("b200").peak_tflops["bf16"] == 2250
    assert load_hardware("h200").peak_tflops["bf16"] == 989
    for h in all_hardware().values():
        if "fp8" in h.peak_tflops:
            assert h.peak_tflops["fp8"] == pytest.approx(2 * h.peak_tflops["bf16"], rel=0.05), h.id


def test_unverified_names_real_fields():
    for h in all_hardware().values():
        for f in h.unverified:
            top, _, sub = f.partition(".")
            assert top in type(h).model_fields, (h.id, f)
            if sub:
                assert sub in getattr(h, top), (h.id, f)


def test_no_fp8_where_unsupported():
    assert "fp8" not in load_hardware("a100-sxm").peak_tflops
    assert "fp8" not in load_hardware("ascend-910b").peak_tflops
