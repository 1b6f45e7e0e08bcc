"""Every input checked at the boundary (issue 24): files that are not UTF-8, infinity and NaN in configs and flags,
run files with fields of the wrong type, duplicate YAML keys, a decode context beyond the model's, `bench --plan
--resume`, and errors that name the right file. Each case: exit 2 and one line naming the file (or flag) and the
field, no traceback. In process (invoke_cli); nothing here measures more than a plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CEILINGS_SUITE, invoke_cli
from test_report import make_run, synthetic_points
from tokenfleet import config, results
from tokenfleet.config import CONFIG_ROOT, ConfigError

LATIN1 = "id: x\ndescription: caf\xe9 cr\xe8me\n".encode("latin-1")
BINARY = bytes(range(256)) * 4


def one_line(r, *needles: str) -> str:
    """The one error line of an exit-2 result, holding every needle."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _file(tmp_path: Path, name: str, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def _yaml(name: str) -> dict:
    return yaml.safe_load((CONFIG_ROOT / name).read_text())


# --- text that is not UTF-8 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [BINARY, LATIN1], ids=["binary", "latin-1"])
def test_suite_fleet_model_that_are_not_utf8_name_the_file(tmp_path, data):
    suite = _file(tmp_path, "suite.yaml", data)
    one_line(invoke_cli("bench", "--suite", str(suite), "--plan"), str(suite), "not UTF-8")
    fleet = _file(tmp_path, "fleet.yaml", data)
    one_line(invoke_cli("capacity", "--fleet", str(fleet)), str(fleet), "not UTF-8")
    model = _file(tmp_path, "model.yaml", data)
    one_line(invoke_cli("project", "-m", str(model), "-g", "h100-sxm"), str(model), "not UTF-8")


def test_latin1_error_names_the_line_and_byte(tmp_path):
    with pytest.raises(ConfigError, match=r"suite.yaml: line 2: not UTF-8 text \(byte 0xe9"):
        config.read_yaml(_file(tmp_path, "suite.yaml", LATIN1))


def test_binary_manifest_under_report_names_the_file(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points()[:3])
    (run / "manifest.json").write_bytes(BINARY)
    one_line(invoke_cli("report", str(run)), str(run / "manifest.json"), "not UTF-8")


def test_binary_line_in_the_middle_of_points_names_its_line(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points()[:3])
    lines = (run / "points.jsonl").read_bytes().splitlines(keepends=True)
    (run / "points.jsonl").write_bytes(lines[0] + b"\xff\xfe{}\n" + b"".join(lines[1:]))
    one_line(invoke_cli("report", str(run)), "points.jsonl: line 2", "not UTF-8")


def test_binary_workload_named_by_workload_names_the_file(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT, root)
    (root / "workloads" / "broken.yaml").write_bytes(BINARY)
    monkeypatch.setattr(config, "CONFIG_ROOT", root)
    one_line(invoke_cli("project", "-m", "qwen3-8b", "-g", "h100-sxm", "--workload", "broken"),
             str(root / "workloads" / "broken.yaml"), "not UTF-8")


# --- infinity and NaN --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old,new,field", [
    ("copy_mb: 8", "copy_mb: .inf", "ceilings.copy_mb"),
    ("min_time_s: 0.01", "min_time_s: .inf", "timing.min_time_s"),
    ("noise_limit: 0.5", "noise_limit: .nan", "noise_limit"),
])
def test_infinite_and_nan_suite_values_are_refused(tmp_path, old, new, field):
    suite = _file(tmp_path, "suite.yaml", TINY_CEILINGS_SUITE.format(id="suite").replace(old, new))
    one_line(invoke_cli("bench", "--suite", str(suite), "--plan"), str(suite), f"{field}: ", "finite")


def test_infinite_peak_factor_in_a_fleet_is_refused(tmp_path):
    data = _yaml("fleets/h100-node.yaml")
    fleet = _file(tmp_path, "fleet.yaml", yaml.safe_dump({**data, "peak_factor": float("inf")}))
    one_line(invoke_cli("capacity", "--fleet", str(fleet)), str(fleet), "peak_factor", "finite")


@pytest.mark.parametrize("flag,value", [("--peak-factor", "inf"), ("--peak-factor", "nan"),
                                        ("--demand-tokens-per-day", "inf"), ("--utilization", "nan")])
def test_infinite_and_nan_capacity_flags_are_refused(flag, value):
    one_line(invoke_cli("capacity", flag, value), f"error: {flag}: ", "not a finite number")


@pytest.mark.parametrize("flag,value", [("--peak-factor", "1e308"), ("--utilization", "1e-308")])
def test_finite_capacity_flags_that_overflow_are_one_line(flag, value):
    """Finite flags whose arithmetic is not (demand x 1e308 is inf; GPUs needed from it an OverflowError): one line
    naming the flag, exit 2, no traceback."""
    one_line(invoke_cli("capacity", flag, value, "--quiet"), f"{flag} {float(value):g}", "out of range")


@pytest.mark.parametrize("args", [["project", "-m", "qwen3-8b", "-g", "h100-sxm", "--tpot-ms", "nan"],
                                  ["project", "-m", "qwen3-8b", "-g", "h100-sxm", "--utilization", "inf"],
                                  ["compare", "a", "b", "--fail-over", "nan"]])
def test_nan_flags_are_refused_naming_the_flag(args):
    flag = next(a for a in args if a.startswith("--"))
    one_line(invoke_cli(*args), flag)


def test_hardware_with_infinite_bandwidth_is_refused(tmp_path):
    data = _yaml("hardware/h100-sxm.yaml")
    hw = _file(tmp_path, "hw.yaml", yaml.safe_dump({**data, "memory_bandwidth_gbps": float("inf")}))
    one_line(invoke_cli("project", "-m", "qwen3-8b", "-g", str(hw)), str(hw), "memory_bandwidth_gbps", "finite")


@pytest.mark.parametrize("fmt", ["json", "csv", "md", "table"])
def test_project_tpot_inf_means_no_limit_in_every_format(fmt):
    r = invoke_cli("project", "-m", "qwen3-8b", "-g", "h100-sxm", "--tpot-ms", "inf", "-f", fmt)
    assert r.exit_code == 0, (r.stderr, r.exception)
    if fmt == "json":
        out = json.loads(r.stdout)
        assert out["tpot_limit_ms"] is None and out["tpot_ok"] is True  # JSON has no infinity: null, no limit
    else:
        assert "tpot_limit_ms" in r.stdout and "inf" in r.stdout


# --- run files with fields of the wrong type ---------------------------------------------------------------------


def _edit_manifest(run: Path, **fields) -> None:
    m = json.loads((run / "manifest.json").read_text())
    m.update(fields)
    (run / "manifest.json").write_text(json.dumps(m))


def _edit_point(run: Path, line: int, **fields) -> None:
    lines = (run / "points.jsonl").read_text().splitlines()
    lines[line - 1] = json.dumps({**json.loads(lines[line - 1]), **fields})
    (run / "points.jsonl").write_text("\n".join(lines) + "\n")


def test_manifest_device_as_a_string_is_refused_by_report_and_resume(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points()[:3])
    _edit_manifest(run, environment={"device": "H100"})
    manifest = str(run / "manifest.json")
    one_line(invoke_cli("report", str(run)), manifest, "environment.device")
    one_line(invoke_cli("bench", "--resume", str(run), "--quiet"), manifest, "environment.device")


def test_manifest_ceilings_as_a_string_is_refused(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points()[:3])
    _edit_manifest(run, ceilings="fast")
    one_line(invoke_cli("report", str(run)), str(run / "manifest.json"), "ceilings")
    one_line(invoke_cli("capacity", "--run", str(run)), str(run / "manifest.json"), "ceilings")


def test_point_median_as_a_string_is_refused_by_compare(tmp_path):
    a = make_run(tmp_path / "a", synthetic_points(), run_id="a")
    b = make_run(tmp_path / "b", synthetic_points(), run_id="b")
    _edit_point(b, 4, median_ms="1.5")
    one_line(invoke_cli("compare", str(a), str(b)), str(b / "points.jsonl"), "line 4.median_ms")


def test_point_batch_one_is_refused_by_report(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points())
    line = next(i for i, p in enumerate(results.read_points(run), 1) if p.get("batch") is not None)
    _edit_point(run, line, batch="one")
    one_line(invoke_cli("report", str(run)), str(run / "points.jsonl"), f"line {line}.batch")


def test_nan_in_a_run_file_is_refused(tmp_path):
    run = make_run(tmp_path / "run", synthetic_points()[:3])
    text = (run / "points.jsonl").read_text().splitlines()
    text[0] = text[0].replace('"median_ms": 0.74', '"median_ms": NaN')
    (run / "points.jsonl").write_text("\n".join(text) + "\n")
    one_line(invoke_cli("report", str(run)), "points.jsonl: line 1")


def test_the_writer_refuses_a_record_of_the_wrong_type(tmp_path):
    with pytest.raises(ValueError, match="median_ms"):
        make_run(tmp_path / "run", [{"kind": "kernel", "op": "x", "status": "ok", "median_ms": "fast"}])


@pytest.mark.parametrize(("field", "bad"), [("speed_us", 5.0), ("speed_during_us", ["5"]), ("speed_fastest_us", "x"),
                                          ("retries", 1.5)])
def test_a_points_speed_readings_are_typed(tmp_path, field, bad):
    """The CPU speed probe's fields of a point's `load` (tokenfleet.measure.load) are validated as the rest."""
    good = {"kind": "kernel", "op": "x", "status": "ok", "median_ms": 1.0,
            "load": {"speed_us": [4.7, 4.8], "speed_during_us": [4.7], "speed_fastest_us": 4.6, "retries": 1}}
    make_run(tmp_path / "ok", [good])
    with pytest.raises(ValueError, match=field):
        make_run(tmp_path / "bad", [{**good, "load": {**good["load"], field: bad}}])


def test_gpu_point_shapes_validate(tmp_path):
    """What a GPU run writes, which no CPU test measures: a probe's polled telemetry (min/median/max), a point's
    telemetry read once, the distributed fields and a fractional probe size."""
    polled = {"polls": 40, "interval_s": 0.05, "sm_clock_mhz": {"min": 1755, "median": 1980.0, "max": 1980},
              "clock_event_reasons": ["SwPowerCap"]}
    pts = [{"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 0.5, "status": "ok", "value": 3000.0,
            "median_ms": 1.0, "telemetry": polled, "launch_us": 4.2, "graph_calls": 8, "l2_copies": 3},
           {"kind": "decode", "model": "m", "backend": "triton", "dtype": "bf16", "batch": 8, "context": 4096,
            "status": "ok", "median_ms": 2.0, "telemetry": {"sm_clock_mhz": 1980, "power_w": 512.5},
            "median_ms_by_rank": [2.0, None], "telemetry_by_rank": [None, {"sm_clock_mhz": 1980}], "tp": 2,
            "world_size": 2, "layers": None, "scaled_from_layers": 4}]
    run = make_run(tmp_path / "run", pts)
    assert [p["telemetry"]["sm_clock_mhz"] for p in results.read_points(run)] == [polled["sm_clock_mhz"], 1980]


def test_reference_runs_still_read():
    for manifest in (config.CHECKOUT_ROOT or Path(".")).glob("results/reference/**/manifest.json"):
        m, pts = results.read_run(manifest.parent)
        assert m["run_id"] and pts


# --- duplicate keys, model context, --plan --resume, the file named ----------------------------------------------


def test_duplicate_yaml_key_is_refused_naming_key_and_file(tmp_path):
    suite = _file(tmp_path, "suite.yaml", TINY_CEILINGS_SUITE.format(id="suite") + "noise_limit: 0.2\n")
    one_line(invoke_cli("bench", "--suite", str(suite), "--plan"), str(suite), "'noise_limit' given twice")
    nested = _file(tmp_path, "nested.yaml", TINY_CEILINGS_SUITE.format(id="nested").replace(
        "copy_mb: 8", "copy_mb: 8\n  copy_mb: 16"))
    one_line(invoke_cli("bench", "--suite", str(nested), "--plan"), str(nested), "'copy_mb' given twice")


def test_decode_context_beyond_the_model_is_refused_at_load(tmp_path):
    suite = _file(tmp_path, "suite.yaml", "id: s\ndescription: d\ndecode: {models: [tiny-qwen3], "
                                          "context: [128, 10000000]}\n")
    one_line(invoke_cli("bench", "--suite", str(suite), "--plan"), str(suite), "decode.context.1",
             "exceed tiny-qwen3's context of 512")
    prefill = _file(tmp_path, "prefill.yaml", "id: p\ndescription: d\nprefill: {models: [tiny-qwen3], "
                                              "prompt_len: [100000]}\n")
    one_line(invoke_cli("bench", "--suite", str(prefill), "--plan"), "prefill.prompt_len.0")


def test_plan_resume_plans_the_runs_suite(tmp_path):
    suite = _file(tmp_path, "mine.yaml", TINY_CEILINGS_SUITE.format(id="mine"))
    run = tmp_path / "run"
    results.RunWriter(run, {"run_id": "r", "suite": "mine", "config": {**yaml.safe_load(suite.read_text())},
                            "environment": {"device": {"name": "cpu"}}, "ceilings": {}}).close()
    r = invoke_cli("bench", "--plan", "--resume", str(run), "-f", "json")
    assert r.exit_code == 0, (r.stderr, r.exception)
    out = json.loads(r.stdout)
    assert out["suite"] == "mine" and out["resume"] == str(run) and out["final_points"] == 0
    assert {j["part"] for j in out["jobs"]} <= {"ceilings", "ceilings (end)"}
    one_line(invoke_cli("bench", "--plan", "--resume", str(tmp_path / "nope")), "nope", "run folder not found")


def test_compare_with_a_missing_manifest_names_that_runs_file(tmp_path):
    a = make_run(tmp_path / "a", synthetic_points()[:3], run_id="a")
    b = make_run(tmp_path / "b", synthetic_points()[:3], run_id="b")
    (a / "manifest.json").unlink()
    line = one_line(invoke_cli("compare", str(a), str(b)), str(a / "manifest.json"))
    assert str(b) not in line
    (a / "manifest.json").write_text("{}")
    (b / "manifest.json").unlink()
    one_line(invoke_cli("compare", str(a), str(b)), str(b / "manifest.json"))


def test_suite_by_name_with_another_id_names_its_own_file(tmp_path, monkeypatch):
    root = tmp_path / "configs"
    shutil.copytree(CONFIG_ROOT, root)
    (root / "suites" / "mine.yaml").write_text(TINY_CEILINGS_SUITE.format(id="ci-cpu"))
    monkeypatch.setattr(config, "CONFIG_ROOT", root)
    mine = root / "suites" / "mine.yaml"
    one_line(invoke_cli("bench", "--suite", "mine", "--plan"), f"{mine}: id: 'ci-cpu'", "file name 'mine'")
    # The same file by a path that is not spelled as config_dir: still that file, still refused.
    monkeypatch.chdir(root)
    one_line(invoke_cli("bench", "--suite", "suites/mine.yaml", "--plan"), "suites/mine.yaml: id: 'ci-cpu'")
