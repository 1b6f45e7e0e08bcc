"""Default efficiencies per accelerator family (configs/efficiency/families.yaml, tokenfleet.capacity.families): a
family's published measurements move its defaults, rows say which efficiencies they used, runs are carried across
families by the same ratios, and a bad families file is one line naming file and field (exit 2)."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO, invoke_cli
from tokenfleet.capacity import families as F
from tokenfleet.capacity.calibrate import DEFAULT_E_C, DEFAULT_E_M, read_runs
from tokenfleet.capacity.config import Fleet
from tokenfleet.capacity.fleet import capacity_table
from tokenfleet.capacity.pools import project_deployment
from tokenfleet.capacity.project import project
from tokenfleet.config import ConfigError, known_names
from tokenfleet.hardware import load_hardware

REF = REPO / "results" / "reference" / "h200-2026-11-28"
RUNS = [REF / "followup" / "run", REF / "quick" / "run"]


def _expected(gpu: str, field: str) -> float:
    """The family default from the file's own numbers: global default × achieved fraction / reference's."""
    fam = F.family_of(gpu)
    a = getattr(fam, field) if fam else None
    base = DEFAULT_E_C if field == "compute" else DEFAULT_E_M
    return base * (a.achieved / a.peak) / (a.ref_achieved / a.ref_peak) if a and not a.unverified else base


def test_every_accelerator_datasheet_is_in_one_family():
    fams = F.load_families()
    listed = [g for f in fams.families for g in f.gpus]
    gpus = [h for h in known_names("hardware") if load_hardware(h).vendor != "cpu"]
    assert sorted(listed) == sorted(gpus)  # a new datasheet needs a family row (or a stated global default)
    for f in fams.families:
        for a in (f.compute, f.memory):
            if a:  # the peak quoted is the datasheet's, where the device is ours
                assert a.source and 0 < a.achieved <= a.peak
    ascend = F.family_of("ascend-910b")
    assert ascend.compute.peak == load_hardware("ascend-910b").peak_tflops["bf16"]
    assert ascend.memory.peak == load_hardware("ascend-910b").memory_bandwidth_gbps


def test_a_family_default_is_used_for_its_family():
    e = F.family_efficiency("a100-sxm")  # compute measured beside H100 by one tool; memory keeps the global default
    assert e.kind == "family default"
    assert e.compute == pytest.approx(_expected("a100-sxm", "compute")) == pytest.approx(0.5 * (267.9 / 312) /
                                                                                         (821.2 / 989))
    assert e.memory == DEFAULT_E_M and "nvidia-ampere" in e.source
    # an unverified measurement (source not identified) is recorded, not applied: 910B keeps the global defaults
    a = F.family_efficiency("ascend-910b")
    assert F.family_of("ascend-910b").compute.unverified and F.family_ratio("ascend-910b", "compute") == 1.0
    assert (a.kind, a.compute, a.memory) == ("global default", DEFAULT_E_C, DEFAULT_E_M)
    assert "unverified" in a.source
    # the reference family keeps the global defaults and says why
    h = F.family_efficiency("h20")
    assert (h.kind, h.compute, h.memory) == ("global default", DEFAULT_E_C, DEFAULT_E_M)
    assert "nvidia-hopper" in h.source
    # a projection of that family runs on them, and says so
    r = project("qwen3-30b-a3b", "a100-sxm", "chat", "bf16", tp=1)
    assert r["efficiency_source"] == "family default" and r["efficiency"]["kind"] == "family default"
    assert r["efficiency"]["compute"] == pytest.approx(e.compute)
    g = project("qwen3-30b-a3b", "h20", "chat", "bf16", tp=1)
    assert g["efficiency_source"] == "global default" and g["efficiency"]["memory"] == DEFAULT_E_M
    d = project_deployment("qwen3-30b-a3b", "a100-sxm", "chat", "qwen3-moe-dp-ep8", "bf16")
    assert d["efficiency_source"] == "family default" and d["efficiency"]["compute"] == pytest.approx(e.compute)
    screen = invoke_cli("project", "-m", "qwen3-30b-a3b", "-g", "a100-sxm", "--deployment", "qwen3-moe-dp-ep8")
    assert screen.exit_code == 0 and f"efficiency: family default, e_c {e.compute:.3g}" in screen.stdout


def test_a_fleet_row_reports_which_efficiencies_it_used():
    fleet = Fleet(id="two", description="two families", gpus=[
        {"gpu": "h20", "count": 10, "source": "test"}, {"gpu": "a100-sxm", "count": 10, "source": "test"}],
        models=[{"model": "qwen3-30b-a3b", "share": 1.0, "dtype": "bf16"}], workloads=[{"workload": "chat",
                                                                                       "share": 1.0}])
    rows, _ = capacity_table(fleet)
    by = {r["gpu"]: r for r in rows}
    assert by["h20"]["efficiency_source"] == "global default" and by["h20"]["e_c"] == DEFAULT_E_C
    assert by["a100-sxm"]["efficiency_source"] == "family default"
    assert by["a100-sxm"]["e_c"] == pytest.approx(_expected("a100-sxm", "compute"))


def test_a_run_is_carried_to_another_family_by_the_ratios():
    runs = read_runs(RUNS)  # H200 (nvidia-hopper: ratio 1)
    own = F.efficiency_for(runs, "h100-sxm", "bf16")
    assert own.kind == "calibrated" and "carried" not in own.source
    other = F.efficiency_for(runs, "a100-sxm", "bf16")
    assert other.kind == "calibrated" and "carried" in other.source
    assert other.compute == pytest.approx(min(own.compute * F.family_ratio("a100-sxm", "compute"), 1))
    assert other.memory == pytest.approx(own.memory)  # no applied A100 bandwidth measurement: ratio 1
    assert other.compute > own.compute  # A100's matmul search reaches a larger share of its peak than H100's (1.03x)


def _write(tmp_path, edit) -> str:
    data = yaml.safe_load(F.FAMILIES_FILE.read_text())
    edit(data)
    p = tmp_path / "families.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["families"][-1]["compute"].update(achieved=400.0), "families.6.compute"),  # above the 353.9 peak
    (lambda d: d["families"][0]["gpus"].append("h100-pcie"), None),  # in two families
    (lambda d: d["families"][0]["gpus"].append("h999"), "families.0.gpus.4"),  # unknown datasheet
    (lambda d: d["families"][0].pop("default_reason"), "families.0"),  # a global default with no reason
    (lambda d: d["families"][1]["compute"].pop("source"), "families.1.compute.source"),
    (lambda d: d["families"][1]["compute"].update(typo=1), "families.1.compute.typo"),
])
def test_bad_families_file_is_one_line_naming_file_and_field(tmp_path, edit, field):
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as e:
        F.load_families(path)
    assert e.value.file == path and "\n" not in str(e.value)
    if field:
        assert e.value.field == field, str(e.value)


def test_bad_families_file_exits_2_at_the_cli(tmp_path, monkeypatch):
    path = _write(tmp_path, lambda d: d["families"][-1]["memory"].update(peak=-1))
    monkeypatch.setattr(F, "FAMILIES_FILE", type(F.FAMILIES_FILE)(path))
    F._families.cache_clear()
    try:
        res = invoke_cli("project", "-m", "qwen3-30b-a3b", "-g", "h20", "--tp", "1")
    finally:
        F._families.cache_clear()
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and path in err and "families.6.memory.peak" in err
