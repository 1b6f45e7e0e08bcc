"""The CLI: valid JSON from `env`, and every bad-input path exits 2 with one line naming the file and field.

Two of these run `python -m tokenfleet` in a subprocess (stdout and stderr exactly as a user's shell gets them, nothing
printed at start-up); the rest invoke the same typer app in this process (exit code, stdout and stderr apart),
without a torch start-up each."""

import json
import re

from conftest import TINY_CEILINGS_SUITE, run_cli
from tokenfleet.cli.main import app
from typer.testing import CliRunner


def _invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "120"})


def one_error_line(res):
    """`res`: a subprocess's CompletedProcess or an in-process CliRunner result."""
    code = res.returncode if hasattr(res, "returncode") else res.exit_code
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert code == 2, (code, res.stderr, getattr(res, "exception", None))
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_env_json():
    proc = run_cli("env", "--format", "json", "--device", "cpu")  # a subprocess: stdout is the JSON and only that
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["device"]["kind"] == "cpu"


def test_env_ceilings_json(tmp_path, monkeypatch):
    # The default suite's ceilings at a test's sizes (the CPU default's take seconds and assert nothing more).
    from tokenfleet.measure import runner

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_CEILINGS_SUITE.format(id="tiny"))
    monkeypatch.setattr(runner, "default_suite", lambda kind: str(suite))
    res = _invoke("env", "--ceilings", "--format", "json", "--device", "cpu")
    assert res.exit_code == 0, (res.stderr, res.exception)
    data = json.loads(res.stdout)
    assert data["device"]["kind"] == "cpu"
    assert data["ceilings"]["copy_gbps"] > 0
    assert all(v > 0 for v in data["ceilings"]["matmul_tflops"].values())
    assert {p["op"] for p in data["ceilings"]["points"]} >= {"copy", "matmul", "matvec"}


def test_yaml_that_does_not_parse(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: [unclosed\n")
    line = one_error_line(_invoke("bench", "--suite", str(bad)))
    assert str(bad) in line and "not valid YAML" in line


def test_suite_field_that_does_not_validate(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: d\nnoise_limit: -1\nceilings: {copy_mb: 8, matmul: {fp32: 64}, "
                   "matvec: {n: 8, k: 8, dtypes: [fp32]}}\n")
    line = one_error_line(_invoke("bench", "--suite", str(bad)))
    assert str(bad) in line and "noise_limit" in line


def test_unknown_field_in_a_part(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\ndescription: d\nceilings: {copy_mb: 8, matmul: {fp32: 64}, "
                   "matvec: {n: 8, k: 8, dtypes: [fp32]}, colour: red}\n")
    line = one_error_line(_invoke("bench", "--suite", str(bad)))
    assert "ceilings.colour" in line


def test_unknown_suite_lists_known():
    line = one_error_line(run_cli("bench", "--suite", "no-such-suite"))  # a subprocess: only this line on stderr
    assert "no-such-suite" in line and "ci-cpu" in line


def test_unknown_device():
    line = one_error_line(_invoke("env", "--device", "tpu"))
    assert "tpu" in line and "cpu, cuda" in line


def test_resume_of_missing_or_unknown_schema_run(tmp_path):
    line = one_error_line(_invoke("bench", "--resume", str(tmp_path / "nope")))
    assert "nope" in line
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 42, "suite": "ci-cpu", "run_id": "x"}))
    line = one_error_line(_invoke("bench", "--resume", str(run)))
    assert "manifest.json" in line and "schema_version" in line


def test_bad_format():
    line = one_error_line(_invoke("env", "--format", "xml"))
    assert "--format" in line


# ---- what --help advertises is what the verbs take ---------------------------------------------------------------


VERBS = ("env", "bench", "project", "capacity", "report", "compare")


def test_help_shows_real_metavars():
    for verb in VERBS:
        out = _invoke(verb, "--help").output
        assert "<bool>" not in out and "<list[" not in out and "<float>" not in out and "<path>" not in out, verb


def test_help_formats_are_the_accepted_ones():
    for verb, formats in (("env", ["table", "json", "md"]), ("capacity", ["table", "json", "csv", "md"]),
                          ("project", ["table", "json", "csv", "md"]), ("compare", ["table", "json", "csv", "md"]),
                          ("bench", ["table", "json", "csv", "md"])):
        m = re.search(r"--format ([a-z|]+)", _invoke(verb, "--help").output)
        assert m and m.group(1).split("|") == formats, verb
    assert "-f, --format" not in _invoke("report", "--help").output  # report writes files; README says so
    assert _invoke("env", "--format", "csv").exit_code == 2


def test_project_without_workload_names_the_default():
    r = _invoke("project", "--model", "qwen3-0.6b", "--gpu", "h100-sxm")
    assert r.exit_code == 0, r.output
    assert "workload chat: the default" in r.output
    r = _invoke("project", "--model", "qwen3-0.6b", "--gpu", "h100-sxm", "--format", "json")
    data = json.loads(r.output)
    assert data["workload"] == "chat" and data["workload_defaulted"] is True
    r = _invoke("project", "--model", "qwen3-0.6b", "--gpu", "h100-sxm", "--format", "csv")
    assert r.exit_code == 0 and r.output.startswith("field,value")


def test_terminal_table_never_splits_a_header_word():
    from tokenfleet.output import render

    rows = [{"gpu": "ascend-910b", "coverage_vs_china_reported": 1.259, "tokens_per_s_per_gpu": 1275.4,
             "gpus_needed_alone": 1061082, f"c{i}_with_a_long_header_name": 0.5} for i in range(9)]
    text = render(rows, "table")
    words = {w for c in rows[0] for w in c.split("_")}
    head = text.split("┡")[0]
    cells = {t.strip() for line in head.splitlines() for t in line.split("┃")}
    assert words <= {w for c in cells for w in c.split()}  # every word whole in some header line
    assert "1,061,082" in text and "ascend-910b" in text
    assert all(line.rstrip().endswith(("┓", "┃", "┩", "│", "┘")) for line in text.splitlines()[1:] if line.strip())
