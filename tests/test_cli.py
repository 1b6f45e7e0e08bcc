"""The CLI: valid JSON from `env`, and every bad-input path exits 2 with one line naming the file and field."""

import json

from tests.conftest import run_cli


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_env_ceilings_json():
    proc = run_cli("env", "--ceilings", "--format", "json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["device"]["kind"] == "cpu"
    assert data["ceilings"]["copy_gbps"] > 0
    assert all(v > 0 for v in data["ceilings"]["matmul_tflops"].values())


def test_yaml_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: [unclosed\n")
    line = one_error_line(run_cli("bench", "--suite", str(bad)))
    assert str(bad) in line and "not valid YAML" in line


def test_suite_field_that_does_not_validate(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: d\nnoise_limit: -1\nceilings: {copy_mb: 8, matmul: {fp32: 64}, "
                   "matvec: {n: 8, k: 8, dtypes: [fp32]}}\n")
    line = one_error_line(run_cli("bench", "--suite", str(bad)))
    assert str(bad) in line and "noise_limit" in line


def test_unknown_field_in_a_part(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: d\nceilings: {copy_mb: 8, matmul: {fp32: 64}, "
                   "matvec: {n: 8, k: 8, dtypes: [fp32]}, colour: red}\n")
    line = one_error_line(run_cli("bench", "--suite", str(bad)))
    assert "ceilings.colour" in line


def test_unknown_suite_lists_known():
    line = one_error_line(run_cli("bench", "--suite", "no-such-suite"))
    assert "no-such-suite" in line and "ci-cpu" in line


def test_unknown_device():
    line = one_error_line(run_cli("env", "--device", "tpu"))
    assert "tpu" in line and "cpu, cuda" in line


def test_resume_of_missing_or_unknown_schema_run(tmp_path):
    line = one_error_line(run_cli("bench", "--resume", str(tmp_path / "nope")))
    assert "nope" in line
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 42, "suite": "ci-cpu", "run_id": "x"}))
    line = one_error_line(run_cli("bench", "--resume", str(run)))
    assert "manifest.json" in line and "schema_version" in line


def test_bad_format():
    line = one_error_line(run_cli("env", "--format", "xml"))
    assert "--format" in line
