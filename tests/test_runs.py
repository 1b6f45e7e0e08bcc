"""Run folders: schema refusal, truncated points, resume after an interruption, and the runner's failure rows.
(Kills, locks, full disks and resume's exactly-once rule: tests/test_reliability.py.)"""

import json

import pytest
from conftest import TINY_CEILINGS_SUITE
from tokenfleet import results
from tokenfleet.config import ConfigError
from tokenfleet.measure.device import detect
from tokenfleet.measure.runner import Job, RunContext, execute, job_key, plan_all, run_suite
from tokenfleet.measure.suite import load_suite
from tokenfleet.report.tables import write_tables


def make_run(tmp_path, points=()):
    w = results.RunWriter(tmp_path / "run", {"run_id": "r1", "suite": "tiny", "command": "test"})
    for p in points:
        w.append(p)
    w.close()
    return tmp_path / "run"


def test_round_trip_and_schema_refusal(tmp_path):
    run = make_run(tmp_path, [{"kind": "ceiling", "op": "copy", "status": "ok", "value": 1.0}])
    manifest, points = results.read_run(run)
    assert manifest["schema_version"] == results.SCHEMA_VERSION
    assert points[0]["run_id"] == "r1" and points[0]["value"] == 1.0

    m = json.loads((run / "manifest.json").read_text())
    m["schema_version"] = 99
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="schema_version.*99") as e:
        results.read_run(run)
    assert "manifest.json" in str(e.value)


def test_point_of_unknown_schema_refused(tmp_path):
    run = make_run(tmp_path, [{"kind": "ceiling", "op": "copy", "status": "ok"}])
    with open(run / "points.jsonl", "a") as f:
        f.write(json.dumps({"schema_version": 7, "kind": "decode", "status": "ok"}) + "\n")
    with pytest.raises(ConfigError, match="points.jsonl: line 2.schema_version"):
        results.read_points(run)


def test_truncated_last_line_ignored_with_warning(tmp_path):
    run = make_run(tmp_path, [{"kind": "ceiling", "op": "copy", "status": "ok"},
                              {"kind": "ceiling", "op": "matmul", "status": "ok"}])
    with open(run / "points.jsonl", "a") as f:
        f.write('{"schema_version": 1, "kind": "dec')
    with pytest.warns(results.RunWarning, match="line 3: damaged last line"):
        points = results.read_points(run)
    assert [p["op"] for p in points] == ["copy", "matmul"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    run = make_run(tmp_path, [{"kind": "ceiling", "op": "copy", "status": "ok"}])
    text = (run / "points.jsonl").read_text()
    (run / "points.jsonl").write_text("{not json\n" + text)
    with pytest.raises(ConfigError, match="line 1"):
        results.read_points(run)


def test_failures_become_rows(tmp_path, tiny_suite):
    from tokenfleet.measure.device import detect
    from tokenfleet.measure.runner import RunContext
    from tokenfleet.measure.suite import load_suite

    ctx = RunContext(device=detect("cpu"), suite=load_suite(str(tiny_suite)), datasheet=None)

    def boom(ctx):
        raise RuntimeError("kernel exploded")

    def oom(ctx):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80.00 GiB")

    assert execute(Job({"kind": "kernel", "op": "x"}, boom), ctx)["status"] == "error"
    p = execute(Job({"kind": "kernel", "op": "x"}, oom), ctx)
    assert p["status"] == "oom" and "out of memory" in p["error"]
    bad = execute(Job({"kind": "kernel", "op": "x"}, lambda c: {"status": "incorrect", "error": "off"}), ctx)
    assert bad["status"] == "incorrect" and "tflops" not in bad


def test_bench_writes_run_and_metrics(tmp_path, tiny_suite):
    run = run_suite(str(tiny_suite), out=tmp_path / "r", progress=False)
    manifest, points = results.read_run(run)
    assert manifest["environment"]["device"]["kind"] == "cpu"
    assert manifest["ceilings"]["copy_gbps"] > 0
    assert manifest["ceilings"]["matmul_tflops"]["fp32"] > 0
    assert {p["op"] for p in points} == {"copy", "read", "matmul", "matvec"}
    assert all(p["status"] in ("ok", "noisy") for p in points)
    matvec = next(p for p in points if p["op"] == "matvec")
    assert 0 < matvec["mbu"]  # reported against this run's copy ceiling
    write_tables(run)  # the derived tables are the report wing's (bench writes them after run_suite)
    assert (run / "summary.md").read_text().startswith("# Run")


def test_interrupted_decode_grid_resumes_without_repeats(tmp_path, monkeypatch):
    # Interrupt (as a kill would) after the second decode point; --resume must finish only the rest.
    suite = tmp_path / "grid.yaml"
    # A huge noise limit: a noisy point is (rightly) measured again on resume, which this test is not about; so is
    # a point above a ceiling that a loaded machine measured low (`above_ceiling`): no margin is exceeded here.
    monkeypatch.setattr("tokenfleet.measure.context.ABOVE_CEILING", float("inf"))
    # Only the planned jobs are counted below: no end-of-run ceiling re-probe in this suite.
    suite.write_text(TINY_CEILINGS_SUITE.format(id="grid").replace("noise_limit: 0.5", "noise_limit: 100").replace(
        "  copy_mb: 8", "  copy_mb: 8\n  end_probe: false") + """
decode:
  models: [tiny]
  backends: [torch]
  dtypes: [fp32]
  batch: [1, 2]
  context: [8, 16]
""")
    seen = []

    def stop_after_two_decode_points(point):
        if point["kind"] == "decode":
            seen.append(point)
            if len(seen) == 2:
                raise KeyboardInterrupt

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_suite(str(suite), out=out, progress=False, on_point=stop_after_two_decode_points)
    before = results.read_points(out)
    assert sum(p["kind"] == "decode" for p in before) == 2

    run_suite(None, resume=out, progress=False)
    after = results.read_points(out)
    # every job of the suite (ceilings and decode points) has exactly one point, under the job's own key
    suite_jobs = plan_all(load_suite(str(suite)), RunContext(device=detect("cpu"), suite=load_suite(str(suite)),
                                                             datasheet=None))
    assert sorted(results.point_key(p) for p in after) == sorted(job_key(j) for j in suite_jobs)
    decode = [(p["batch"], p["context"]) for p in after if p["kind"] == "decode"]
    assert sorted(decode) == [(1, 8), (1, 16), (2, 8), (2, 16)], "each grid point measured exactly once"
    final = [p for p in before if p["status"] in results.FINAL]  # a noisy one (a loaded machine) is measured again
    assert [p for p in after if results.point_key(p) in {results.point_key(q) for q in final}] == final
    assert all(p["status"] in results.USABLE for p in after if p["kind"] == "decode")
