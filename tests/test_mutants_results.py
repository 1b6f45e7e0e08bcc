"""Oracles for tokenfleet.results (`make mutate`'s survivors): every reader's one-line error (file, field, message) for
a bad manifest or points file, the byte arithmetic of a damaged last line, the last-record-per-key rule, the ceilings
folded from probe points (burst rates, replace/keep, best matmul), the run id, the writer's resume bookkeeping and
the defaults, on tmp_path files and values worked out by hand. Fast: no suite runs, no CLI, no timing."""

from __future__ import annotations

import json
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pytest
from tokenfleet import results
from tokenfleet.config import ConfigError

KNOWN = "known: ok, oom, error, incorrect, noisy, above_ceiling, contended, skipped"


def P(**kw) -> dict:
    """A valid point record."""
    return {"schema_version": 1, "kind": "kernel", "status": "ok", **kw}


def line(**kw) -> bytes:
    return json.dumps(P(**kw)).encode() + b"\n"


def warn_spy(monkeypatch) -> list[int]:
    """The `stacklevel` of each warning results.py issues (recorded, then warned from the same place)."""
    levels, warn = [], warnings.warn

    def spy(*args, **kwargs):
        levels.append(kwargs.get("stacklevel", 1))
        warn(*args, **{**kwargs, "stacklevel": levels[-1] + 1})  # one more: this frame
    monkeypatch.setattr(results.warnings, "warn", spy)
    return levels


def names_the_caller(record, fn) -> bool:
    """A warning from `fn` names the test that called it (stacklevel right); under `make mutate`, whose trampolines
    add frames between the two, the stacklevel is pinned by `warn_spy` instead."""
    return hasattr(fn, "__wrapped__") or record.filename == __file__


def err(exc_info) -> tuple[str | None, str | None, str]:
    e = exc_info.value
    return e.file, e.field, e.message


# --- constants the readers share ---------------------------------------------------------------------------------

def test_status_sets():
    assert results.USABLE == {"ok", "noisy"}
    assert results.FINAL == {"ok", "skipped"}
    assert [s for s in results.STATUSES if results.usable({"status": s})] == ["ok", "noisy"]
    assert not results.usable({}) and not results.usable({"status": None})
    assert results.empty_ceilings() == {"copy_gbps": None, "read_gbps": None, "matvec_gbps": {}, "matmul_tflops": {}}
    # a fresh dict each call: folding into one never changes the next
    a = results.empty_ceilings()
    a["matvec_gbps"]["fp32"] = 1.0
    assert results.empty_ceilings()["matvec_gbps"] == {}


# --- JSON, keys, run ids --------------------------------------------------------------------------------------------

def test_loads_refuses_nan_and_infinity():
    assert results.loads('{"a": 1.5}') == {"a": 1.5}
    assert results.loads(b'[1, 2]') == [1, 2]
    for const in ("NaN", "Infinity", "-Infinity", "1e999", "-2.5E400"):
        with pytest.raises(ValueError) as e:
            results.loads(f'{{"a": {const}}}')
        assert str(e.value) == f"{const} is not a number JSON allows"
    assert results.loads("[1.5e308, -0.25, 1e-400, 7]") == [1.5e308, -0.25, 0.0, 7]
    assert type(results.loads("7")) is int and type(results.loads("7.0")) is float


def test_point_key_is_the_non_measured_fields_as_sorted_json():
    p = {"op": "gemm", "m": 8, "median_ms": 1.0, "status": "ok", "kind": "kernel", "path": Path("a/b"),
         "tflops": 3.0, "run_id": "r", "schema_version": 1}
    assert results.point_key(p) == '{"kind": "kernel", "m": 8, "op": "gemm", "path": "a/b"}'
    assert results.point_key({"median_ms": 2.0}) == "{}"


def test_make_run_id(monkeypatch):
    seen = []

    class FixedClock:
        @staticmethod
        def now(tz=None):
            seen.append(tz)
            return datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    monkeypatch.setattr(results, "datetime", FixedClock)
    assert results.make_run_id("NVIDIA H200 (SXM5) 141GB", "quick") == "20260102T030405Z-nvidia-h200-sxm5-141gb-quick"
    assert seen == [timezone.utc]
    assert results.make_run_id("--CPU--", "s") == "20260102T030405Z-cpu-s"
    assert results.make_run_id("!!!", "s") == "20260102T030405Z-device-s"
    # the slug is cut to 40 characters after the hyphens are stripped (a cut may end on one)
    assert results.make_run_id("a" * 39 + " bc", "s") == "20260102T030405Z-" + "a" * 39 + "--s"
    assert results.make_run_id("b" * 45, "s") == "20260102T030405Z-" + "b" * 40 + "-s"


# --- the manifest ---------------------------------------------------------------------------------------------------

def test_check_schema_message(tmp_path):
    results.check_schema({"schema_version": 1}, tmp_path)
    for bad in ({"schema_version": 2}, {}, {"schema_version": "1"}):
        with pytest.raises(ConfigError) as e:
            results.check_schema(bad, tmp_path / "m.json")
        v = bad.get("schema_version")
        assert err(e) == (str(tmp_path / "m.json"), "schema_version",
                          f"unknown schema_version {v!r}; this tokenfleet reads 1")


def write_manifest(run: Path, text: str) -> Path:
    run.mkdir(exist_ok=True)
    (run / "manifest.json").write_text(text)
    return run / "manifest.json"


def test_manifest_json_errors(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert err(e) == (str(run), None, "run folder not found")
    assert str(e.value) == f"{run}: run folder not found"
    run.mkdir()
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert err(e) == (str(run / "manifest.json"), None, "file not found (not a run folder?)")
    path = write_manifest(run, '{"a": 1,\n "b": }')
    with pytest.raises(ConfigError) as e:
        results.manifest_json(str(run))
    assert err(e) == (str(path), "line 2", "not valid JSON (Expecting value)")
    write_manifest(run, '{"a": NaN}')
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert err(e) == (str(path), None, "not valid JSON (NaN is not a number JSON allows)")
    write_manifest(run, '{"schema_version": 1, "run_id": "r", "extra": 1e999}')
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert err(e) == (str(path), None, "not valid JSON (1e999 is not a number JSON allows)")
    write_manifest(run, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert e.value.file == str(path) and e.value.field is None
    assert e.value.message.startswith("not valid JSON (maximum recursion depth")
    write_manifest(run, "[1, 2]")
    with pytest.raises(ConfigError) as e:
        results.manifest_json(run)
    assert err(e) == (str(path), None, "expected a JSON object")
    write_manifest(run, '{"schema_version": 9}')
    assert results.manifest_json(run) == {"schema_version": 9}  # its schema not yet checked


def test_read_manifest_checks_schema_then_fields(tmp_path):
    run = tmp_path / "run"
    path = write_manifest(run, json.dumps({"schema_version": 2}))  # schema first: no "run_id missing"
    with pytest.raises(ConfigError) as e:
        results.read_manifest(run)
    assert err(e) == (str(path), "schema_version", "unknown schema_version 2; this tokenfleet reads 1")
    write_manifest(run, json.dumps({"schema_version": 1, "run_id": 5}))
    with pytest.raises(ConfigError) as e:
        results.read_manifest(run)
    assert err(e) == (str(path), "run_id", "Input should be a valid string")
    write_manifest(run, json.dumps({"schema_version": 1, "run_id": "r", "ceilings": {"copy_gbps": "fast"}}))
    with pytest.raises(ConfigError) as e:
        results.read_manifest(str(run))
    assert err(e) == (str(path), "ceilings.copy_gbps", "Input should be a valid number")
    good = {"schema_version": 1, "run_id": "r", "extra_field": [1]}
    write_manifest(run, json.dumps(good))
    assert results.read_manifest(run) == good


def test_check_without_a_field_names_only_the_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        results._check(results.ManifestRecord, [], tmp_path / "x.json")
    assert err(e) == (str(tmp_path / "x.json"), None,
                      "Input should be a valid dictionary or instance of ManifestRecord")
    with pytest.raises(ConfigError) as e:
        results._check(results.PointRecord, [], tmp_path / "x.json", "line 3")
    assert e.value.field == "line 3"
    with pytest.raises(ConfigError) as e:
        results._check(results.PointRecord, P(m=1.5), tmp_path / "x.json", "line 3")
    assert err(e) == (str(tmp_path / "x.json"), "line 3.m", "Input should be a valid integer")
    with pytest.raises(ConfigError) as e:
        results._check(results.PointRecord, P(m=1.5), tmp_path / "x.json")
    assert e.value.field == "m"
    results._check(results.PointRecord, P(m=2), tmp_path / "x.json")


# --- points ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("record", "field", "message"), [
    ([1], "line 4", "expected a JSON object"),
    ({"kind": "k", "status": "ok"}, "line 4.schema_version", "unknown schema_version None; this tokenfleet reads 1"),
    ({"schema_version": 2, "kind": "k", "status": "ok"}, "line 4.schema_version",
     "unknown schema_version 2; this tokenfleet reads 1"),
    ({"schema_version": 1, "status": "ok"}, "line 4.kind", "missing"),
    ({"schema_version": 1, "kind": 3, "status": "ok"}, "line 4.kind", "not a name: 3"),
    ({"schema_version": 1, "kind": None, "status": "ok"}, "line 4.kind", "not a name: None"),
    ({"schema_version": 1, "kind": "k"}, "line 4.status", f"missing; {KNOWN}"),
    ({"schema_version": 1, "kind": "k", "status": "fine"}, "line 4.status", f"unknown status 'fine'; {KNOWN}"),
    ({"schema_version": 1, "kind": "k", "status": None}, "line 4.status", f"unknown status None; {KNOWN}"),
    ({"schema_version": 1, "kind": "k", "status": "ok", "median_ms": "1"}, "line 4.median_ms",
     "Input should be a valid number"),
    ({"schema_version": 1, "kind": "k", "status": "ok", "noisy": 1}, "line 4.noisy", "Input should be a valid boolean"),
])
def test_check_point_messages(tmp_path, record, field, message):
    with pytest.raises(ConfigError) as e:
        results.check_point(record, tmp_path / "points.jsonl", 4)
    assert err(e) == (str(tmp_path / "points.jsonl"), field, message)


def test_check_point_accepts_every_status_and_unknown_fields(tmp_path):
    for s in results.STATUSES:
        results.check_point(P(status=s, anything={"x": 1}), tmp_path, 1)


def test_parse_points_offsets_and_damage(tmp_path):
    path = tmp_path / "points.jsonl"
    a, b = line(op="a"), line(op="b")
    assert results.parse_points(path, b"") == ([], 0, None)
    assert results.parse_points(path, b"\n  \n") == ([], 0, None)
    assert results.parse_points(path, a + b) == ([P(op="a"), P(op="b")], len(a + b), None)
    # no newline at the end: the good records end at the end of the data, not one past it
    assert results.parse_points(path, a + b[:-1]) == ([P(op="a"), P(op="b")], len(a + b) - 1, None)
    # blank lines count as lines and are skipped
    assert results.parse_points(path, a + b"\n \n" + b) == ([P(op="a"), P(op="b")], len(a) + 3 + len(b), None)
    # a damaged last line: the good records end before it; its size counts to the end of the data
    assert results.parse_points(path, a + b'{"schema') == ([P(op="a")], len(a), "line 2: damaged last line (8 bytes)")
    assert results.parse_points(path, a + b"\n" + b'{"x\n\n  ') == \
        ([P(op="a")], len(a), "line 3: damaged last line (7 bytes)")
    assert results.parse_points(path, b"\xff\xfe\n") == ([], 0, "line 1: damaged last line (3 bytes)")
    assert results.parse_points(path, a + b'{"a": NaN}') == \
        ([P(op="a")], len(a), "line 2: damaged last line (10 bytes)")
    # whitespace-only lines after a damaged one: it is still the last
    assert results.parse_points(path, a + b"garbage\n   ") == \
        ([P(op="a")], len(a), "line 2: damaged last line (11 bytes)")


def test_parse_points_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "points.jsonl"
    a = line(op="a")
    for bad in (b"{not json", b'{"a": Infinity}', b'{"schema_version": 1, "kind": "k", "status": "ok", "x": 1e999}'):
        with pytest.raises(ConfigError) as e:
            results.parse_points(path, a + bad + b"\n" + a)
        assert err(e) == (str(path), "line 2", "not valid JSON")
    with pytest.raises(ConfigError) as e:
        results.parse_points(path, a + b"\n" + b'{"k": "\xff"}\n' + a)
    assert err(e) == (str(path), "line 3", "not UTF-8 text (byte 0xff at offset 7): save the file as UTF-8")
    # a last line that is JSON but not a valid record is refused, not skipped as damage
    with pytest.raises(ConfigError) as e:
        results.parse_points(path, a + json.dumps({"schema_version": 1, "kind": "k", "status": "x"}).encode())
    assert e.value.field == "line 2.status"


def test_latest_keeps_the_last_record_at_the_place_of_the_first():
    recs = [P(op="a", median_ms=1.0), P(op="b", median_ms=2.0), P(op="a", median_ms=3.0, status="noisy")]
    assert results.latest(recs) == [P(op="a", median_ms=3.0, status="noisy"), P(op="b", median_ms=2.0)]


def test_read_points_warns_once_naming_the_file(tmp_path, monkeypatch):
    levels = warn_spy(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    path = run / "points.jsonl"
    path.write_bytes(line(op="a", median_ms=1.0) + line(op="a", median_ms=2.0) + b'{"sch')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pts = results.read_points(str(run))
    assert pts == [P(op="a", median_ms=2.0)]
    assert [(x.category, str(x.message)) for x in w] == \
        [(results.RunWarning, f"{path}: line 3: damaged last line (5 bytes) ignored")]
    assert names_the_caller(w[0], results.read_points) and levels == [2]
    path.write_bytes(line(op="a"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert results.read_points(run) == [P(op="a")]


def test_read_bytes_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as e:
        results.read_bytes(tmp_path / "none")
    assert err(e) == (str(tmp_path / "none"), None, "file not found")
    with pytest.raises(ConfigError) as e:
        results.read_points(tmp_path)
    assert err(e) == (str(tmp_path / "points.jsonl"), None, "file not found")
    f = tmp_path / "f"
    f.write_bytes(b"x")
    assert results.read_bytes(f) == b"x"

    def denied(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError) as e:
        results.read_bytes(f)
    assert err(e) == (str(f), None, "cannot read: Permission denied")

    def bare(self):
        raise OSError("no reason given")
    monkeypatch.setattr(Path, "read_bytes", bare)
    with pytest.raises(ConfigError) as e:
        results.read_bytes(f)
    assert e.value.message == "cannot read: no reason given"


# --- writing ----------------------------------------------------------------------------------------------------------

MANIFEST = {"run_id": "r1", "suite": "tiny", "command": "bench one"}


def test_save_and_update_manifest(tmp_path):
    results.save_manifest(tmp_path, {"schema_version": 1, "run_id": "r", "config": {"p": Path("x")}})
    assert (tmp_path / "manifest.json").read_text() == \
        '{\n  "schema_version": 1,\n  "run_id": "r",\n  "config": {\n    "p": "x"\n  }\n}\n'
    with pytest.raises(ValueError) as e:
        results.save_manifest(tmp_path, {"schema_version": 1})
    assert str(e.value).startswith("manifest to write does not validate: 1 validation error for ManifestRecord\nrun_id")
    with pytest.raises(ValueError, match="Out of range float"):
        results.save_manifest(tmp_path, {"schema_version": 1, "run_id": "r", "config": {"x": float("nan")}})
    assert json.loads((tmp_path / "manifest.json").read_text())["run_id"] == "r"  # the old one stands

    results.update_manifest(tmp_path, failure="rank 1 died", run_id="r2")
    assert json.loads((tmp_path / "manifest.json").read_text()) == \
        {"schema_version": 1, "run_id": "r2", "config": {"p": "x"}, "failure": "rank 1 died"}
    assert not (tmp_path / ".lock").exists()  # released
    with results.RunWriter(tmp_path / "run", MANIFEST):
        with pytest.raises(ConfigError, match="this run is being written by pid"):
            results.update_manifest(tmp_path / "run", failure="x")
    results.update_manifest(tmp_path / "run", failure="x")
    assert results.read_manifest(tmp_path / "run")["failure"] == "x"


def test_resolve_and_load_run(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RUNS_ROOT", tmp_path / "runs")
    run = tmp_path / "runs" / "r1"
    w = results.RunWriter(run, MANIFEST)
    w.append({"kind": "ceiling", "op": "copy", "status": "ok", "value": 2.0})
    w.close()
    assert results.resolve_run(run) == run
    assert results.resolve_run(str(run)) == run
    assert results.resolve_run("r1") == run
    with pytest.raises(ConfigError) as e:
        results.resolve_run("r2")
    assert err(e) == ("r2", None, "run folder not found")
    (tmp_path / "runs" / "afile").write_text("")
    with pytest.raises(ConfigError):
        results.resolve_run("afile")
    r = results.load_run("r1")
    assert (r.path, r.manifest["run_id"], r.points) == (run, "r1", results.read_points(run))
    assert results.load_run(r) is r
    assert results.read_run(run) == (results.read_manifest(run), results.read_points(run))


def test_check_out(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError) as e:
        results.check_out(f)
    assert err(e) == (str(f), None, "exists and is not a folder: give --out a new or empty folder")
    results.check_out(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    d = tmp_path / "d"
    d.mkdir()
    results.check_out(d)
    (d / ".lock").write_text("")
    results.check_out(str(d))  # only a lock: empty
    (d / "b.txt").write_text("")
    with pytest.raises(ConfigError) as e:
        results.check_out(d)
    assert err(e) == (str(d), None, "folder is not empty (b.txt) and is not a tokenfleet run: "
                                    "give --out a new or empty folder")
    (d / "a.txt").write_text("")
    with pytest.raises(ConfigError) as e:
        results.check_out(d)
    assert e.value.message.startswith("folder is not empty (a.txt and 1 more) and")
    (d / "c").mkdir()
    with pytest.raises(ConfigError) as e:
        results.check_out(d)
    assert e.value.message.startswith("folder is not empty (a.txt and 2 more) and")
    (d / "manifest.json").write_text(json.dumps({"schema_version": 1, "run_id": "r"}))
    results.check_out(d)  # a run folder with no points
    (d / "manifest.json").write_text(json.dumps({"schema_version": 3, "run_id": "r"}))
    with pytest.raises(ConfigError, match="unknown schema_version 3"):
        results.check_out(d)
    (d / "points.jsonl").write_text("")
    with pytest.raises(ConfigError) as e:
        results.check_out(d)
    assert err(e) == (str(d), None, "run folder already has points; use --resume or another --out")
    m = tmp_path / "m"
    m.mkdir()
    (m / "manifest.json").write_text("")  # a manifest alone is a run folder: checked
    with pytest.raises(ConfigError, match="not valid JSON"):
        results.check_out(m)


def test_writer_appends_compacts_and_resumes(tmp_path, monkeypatch):
    levels = warn_spy(monkeypatch)
    run = tmp_path / "run"
    with results.RunWriter(run, MANIFEST) as w:
        assert w.last is None and w.points == {} and w._records == 0
        assert w.manifest == {"schema_version": 1, **MANIFEST}
        assert results.read_manifest(run) == {"schema_version": 1, **MANIFEST}
        assert (run / ".lock").exists()
        w.append({"kind": "kernel", "op": "a", "status": "error", "shape": (1, 2)})
        assert w.last == {"schema_version": 1, "run_id": "r1", "kind": "kernel", "op": "a", "status": "error",
                          "shape": [1, 2]}
        w.append({"kind": "kernel", "op": "b", "status": "skipped"})
        w.append({"kind": "kernel", "op": "c", "status": "noisy", "run_id": "other", "value": Scalar()})
        assert w.last["value"] == 2.5  # a numpy scalar is written as its number
        assert w.last["run_id"] == "other"  # a point's own run_id stands
        assert w.final_keys() == {results.point_key(P(op="b"))}
        w.finish(finished="t")
        assert len((run / "points.jsonl").read_text().splitlines()) == 3  # nothing to compact
    assert not (run / ".lock").exists()
    assert w._fd is None
    w.close()  # twice: harmless

    with open(run / "points.jsonl", "ab") as f:
        f.write(b'{"cut')
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        w = results.RunWriter(run, {"command": "bench two", "run_id": "ignored"}, resume=True)
    assert [str(x.message) for x in rec] == \
        [f"{run / 'points.jsonl'}: line 4: damaged last line (5 bytes) cut off before resuming "
         "(a point it held is measured again)"]
    assert names_the_caller(rec[0], results.RunWriter.__init__) and levels == [4]
    assert w.manifest["run_id"] == "r1" and w.manifest["resumed"] == ["bench two"]
    assert results.read_manifest(run)["resumed"] == ["bench two"]
    assert (run / "points.jsonl").read_bytes().endswith(b'"value": 2.5}\n')  # the damaged tail is gone
    assert w.final_keys() == {results.point_key(P(op="b"))}
    w.append({"kind": "kernel", "op": "a", "status": "ok", "median_ms": 1.0, "shape": [1, 2]})
    assert w.final_keys() == {results.point_key(P(op="a", shape=[1, 2])), results.point_key(P(op="b"))}
    assert len((run / "points.jsonl").read_text().splitlines()) == 4
    w.finish()
    lines = (run / "points.jsonl").read_text().splitlines()
    assert [json.loads(x)["op"] for x in lines] == ["a", "b", "c"]
    assert json.loads(lines[0])["status"] == "ok"
    w.append({"kind": "kernel", "op": "d", "status": "ok"})  # the descriptor follows the compacted file
    w.close()
    assert [p["op"] for p in results.read_points(run)] == ["a", "b", "c", "d"]
    assert len((run / "points.jsonl").read_text().splitlines()) == 4

    w = results.RunWriter(run, {"command": None}, resume=True)
    w.close()
    assert results.read_manifest(run)["resumed"] == ["bench two", None]


def test_writer_finish_compacts_only_superseded_records(tmp_path):
    run = tmp_path / "run"
    w = results.RunWriter(run, MANIFEST)
    w.append({"kind": "kernel", "op": "a", "status": "error"})
    w.append({"kind": "kernel", "op": "a", "status": "ok"})
    before = os.stat(run / "points.jsonl").st_ino
    w.finish()
    assert os.stat(run / "points.jsonl").st_ino != before  # rewritten
    assert [json.loads(x)["status"] for x in (run / "points.jsonl").read_text().splitlines()] == ["ok"]
    ino = os.stat(run / "points.jsonl").st_ino
    w.finish()
    assert os.stat(run / "points.jsonl").st_ino == ino  # nothing superseded since: left alone
    w.append({"kind": "kernel", "op": "b", "status": "ok"})
    w.append({"kind": "kernel", "op": "c", "status": "ok"})
    w.finish()
    assert os.stat(run / "points.jsonl").st_ino == ino  # new keys only: one record each, nothing to compact
    w.close()


def test_resume_adds_a_newline_to_a_last_record_without_one(tmp_path):
    run = tmp_path / "run"
    results.RunWriter(run, MANIFEST).close()
    (run / "points.jsonl").write_bytes(line(op="a"))
    ino = os.stat(run / "points.jsonl").st_ino
    results.RunWriter(run, {"command": "c"}, resume=True).close()
    assert os.stat(run / "points.jsonl").st_ino == ino  # whole records: the file is not rewritten
    (run / "points.jsonl").write_bytes(line(op="a")[:-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = results.RunWriter(run, {"command": "c"}, resume=True)
    w.append({"kind": "kernel", "op": "b", "status": "ok"})
    w.close()
    assert (run / "points.jsonl").read_bytes() == line(op="a") + json.dumps(
        {"schema_version": 1, "run_id": "r1", "kind": "kernel", "op": "b", "status": "ok"}).encode() + b"\n"
    # only damage: the whole file was one cut record
    (run / "points.jsonl").write_bytes(b'{"cu')
    with pytest.warns(results.RunWarning):
        w = results.RunWriter(run, {"command": "c"}, resume=True)
    assert w.points == {} and (run / "points.jsonl").read_bytes() == b""
    w.close()
    # blank lines only: no record, nothing damaged, left as it is
    (run / "points.jsonl").write_bytes(b"\n \n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results.RunWriter(run, {"command": "c"}, resume=True).close()
    assert (run / "points.jsonl").read_bytes() == b"\n \n"
    # no points file yet: nothing to repair
    os.unlink(run / "points.jsonl")
    w = results.RunWriter(run, {"command": "c"}, resume=True)
    assert w.points == {} and w._records == 0
    w.close()


def test_writer_refusals_release_the_lock(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="run folder not found"):
        results.RunWriter(run, MANIFEST, resume=True)
    assert not run.exists()
    with results.RunWriter(run, MANIFEST) as w:
        w.append({"kind": "kernel", "op": "a", "status": "ok"})
        with pytest.raises(ValueError) as e:
            w.append({"kind": "kernel", "status": "ok", "m": "8"})
        assert str(e.value).startswith("point to write does not validate: 1 validation error for PointRecord\nm")
        with pytest.raises(ValueError, match="Out of range float"):
            w.append({"kind": "kernel", "status": "ok", "median_ms": float("inf")})
        with pytest.raises(ConfigError, match="being written by"):
            results.RunWriter(run, MANIFEST, resume=True)
    assert len(results.read_points(run)) == 1
    with pytest.raises(ConfigError, match="already has points"):
        results.RunWriter(run, MANIFEST)
    (run / "points.jsonl").write_bytes(b"{bad\n" + line(op="a"))
    with pytest.raises(ConfigError) as e:
        results.RunWriter(run, MANIFEST, resume=True)
    assert err(e) == (str(run / "points.jsonl"), "line 1", "not valid JSON")
    assert not (run / ".lock").exists()  # the failed open let go of the lock
    with pytest.raises(ValueError):  # a manifest that does not validate, after the lock was taken
        results.RunWriter(tmp_path / "r2", {"run_id": 5})
    assert (tmp_path / "r2").is_dir() and not (tmp_path / "r2" / ".lock").exists()


def test_writer_removes_stale_temps(tmp_path):
    run = tmp_path / "run"
    results.RunWriter(run, MANIFEST).close()
    (run / ".points.jsonl.999999999.tmp").write_text("")  # a writer no longer running
    results.RunWriter(run, {"command": "c"}, resume=True).close()
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json", "points.jsonl"]


# --- ceilings ---------------------------------------------------------------------------------------------------------

def probe(op, value, **kw):
    return {"kind": "ceiling", "op": op, "status": "ok", "value": value, **kw}


def test_add_ceiling_sustained_values():
    c = results.empty_ceilings()
    results.add_ceiling(c, probe("copy", 10.0))
    results.add_ceiling(c, probe("read", 12.0, status="noisy"))
    results.add_ceiling(c, probe("matvec", 8.0, dtype="bf16"))
    results.add_ceiling(c, probe("matmul", 0.5, dtype="fp32"))
    results.add_ceiling(c, probe("matmul", 0.25, dtype="fp32"))  # the best shape stays
    results.add_ceiling(c, probe("matmul", 3.0, dtype="bf16"))
    assert c == {"copy_gbps": 10.0, "read_gbps": 12.0, "matvec_gbps": {"bf16": 8.0},
                 "matmul_tflops": {"fp32": 0.5, "bf16": 3.0}}
    results.add_ceiling(c, probe("copy", 9.0))  # replace: the later one
    results.add_ceiling(c, probe("matvec", 7.0, dtype="bf16"))
    results.add_ceiling(c, probe("matmul", 4.0, dtype="fp32"))
    assert (c["copy_gbps"], c["matvec_gbps"], c["matmul_tflops"]["fp32"]) == (9.0, {"bf16": 7.0}, 4.0)


def test_add_ceiling_skips_what_is_not_a_usable_start_probe():
    c = results.empty_ceilings()
    for p in (probe("copy", 1.0, kind="decode"), probe("copy", 1.0, status="contended"), probe("copy", None),
              probe("copy", 1.0, phase="end"), probe("gemm", 1.0), {"kind": "ceiling", "op": "copy", "status": "ok"}):
        results.add_ceiling(c, p)
    assert c == results.empty_ceilings()
    results.add_ceiling(c, {"op": "copy", "status": "ok", "value": 2.0})  # no kind: a ceiling probe
    assert c["copy_gbps"] == 2.0
    results.add_ceiling(c, probe("copy", 3.0), phase="end")  # a start probe when the end is folded
    assert c["copy_gbps"] == 2.0
    results.add_ceiling(c, probe("copy", 0.0))  # zero folds (replace)
    assert c["copy_gbps"] == 0.0


def test_add_ceiling_keep_mode_fills_only_what_is_missing():
    c = {"copy_gbps": 5.0, "read_gbps": 0.0, "matvec_gbps": {"bf16": 6.0}, "matmul_tflops": {"bf16": 1.0}}
    for p in (probe("copy", 7.0), probe("read", 3.0), probe("matvec", 9.0, dtype="bf16"),
              probe("matvec", 4.0, dtype="fp32"), probe("matmul", 2.0, dtype="bf16")):
        results.add_ceiling(c, p, replace=False)
    assert c == {"copy_gbps": 5.0, "read_gbps": 3.0, "matvec_gbps": {"bf16": 6.0, "fp32": 4.0},
                 "matmul_tflops": {"bf16": 2.0}}  # matmul: always the best
    c = {}
    results.add_ceiling(c, probe("copy", 7.0), replace=False)
    results.add_ceiling(c, probe("matvec", 1.0, dtype="fp8"), replace=False)
    assert c == {"copy_gbps": 7.0, "matvec_gbps": {"fp8": 1.0}}


def test_add_ceiling_burst_rates():
    c = results.empty_ceilings()
    # value 10 GB/s over a 4 ms median; its burst took 2.5 ms for the same bytes: 10 * 4 / 2.5 = 16
    results.add_ceiling(c, probe("copy", 10.0, median_ms=4.0, burst_ms=2.5))
    results.add_ceiling(c, probe("read", 12.0, median_ms=3.0, burst_ms=2.0))
    results.add_ceiling(c, probe("matvec", 6.0, dtype="bf16", median_ms=1.0, burst_ms=0.5))
    results.add_ceiling(c, probe("matmul", 2.0, dtype="fp32", median_ms=3.0, burst_ms=1.5))
    results.add_ceiling(c, probe("matmul", 1.0, dtype="fp32", median_ms=3.0, burst_ms=0.5))  # 6: the best
    assert c == {"copy_gbps": 10.0, "read_gbps": 12.0, "matvec_gbps": {"bf16": 6.0}, "matmul_tflops": {"fp32": 2.0},
                 "burst_copy_gbps": 16.0, "burst_read_gbps": 18.0, "burst_matvec_gbps": {"bf16": 12.0},
                 "burst_matmul_tflops": {"fp32": 6.0}}
    # no burst without both times
    d = results.empty_ceilings()
    results.add_ceiling(d, probe("copy", 10.0, median_ms=4.0))
    results.add_ceiling(d, probe("read", 10.0, burst_ms=4.0))
    results.add_ceiling(d, probe("matvec", 10.0, dtype="x", median_ms=0.0, burst_ms=4.0))
    results.add_ceiling(d, probe("matmul", 10.0, dtype="x", median_ms=4.0, burst_ms=0.0))
    assert set(d) == set(results.empty_ceilings())
    # the end-of-run re-probe folds its sustained rate only
    e = {}
    results.add_ceiling(e, probe("copy", 10.0, median_ms=4.0, burst_ms=2.0, phase="end"), phase="end")
    assert e == {"copy_gbps": 10.0}
    # keep mode keeps a burst rate already there
    f = {"burst_copy_gbps": 1.0}
    results.add_ceiling(f, probe("copy", 10.0, median_ms=4.0, burst_ms=2.0), replace=False)
    assert f == {"burst_copy_gbps": 1.0, "copy_gbps": 10.0}


def test_flat_ceilings():
    c = {"copy_gbps": 10.0, "read_gbps": None, "burst_copy_gbps": 0.0, "matvec_gbps": {"bf16": 6.0, "fp8": None},
         "matmul_tflops": {"fp32": 2.0, "bf16": 0.0}, "other": {}}
    assert results.flat_ceilings(c) == {"copy_gbps": 10.0, "matvec_gbps.bf16": 6.0, "matmul_tflops.fp32": 2.0}
    assert results.flat_ceilings({}) == {}


def test_ceilings_of_completes_the_manifest_from_points():
    pts = [probe("copy", 7.0), probe("read", 3.0), probe("matmul", 9.0, dtype="bf16")]
    assert results.ceilings_of({"ceilings": {"copy_gbps": 5.0, "matmul_tflops": {"bf16": 4.0}}}, pts) == \
        {"copy_gbps": 5.0, "read_gbps": 3.0, "matvec_gbps": {}, "matmul_tflops": {"bf16": 9.0}}
    assert results.ceilings_of({"ceilings": None}, pts[:1]) == \
        {"copy_gbps": 7.0, "read_gbps": None, "matvec_gbps": {}, "matmul_tflops": {}}
    assert results.ceilings_of({}, []) == results.empty_ceilings()


# --- Run --------------------------------------------------------------------------------------------------------------

def test_run_properties(tmp_path):
    pts = [P(op="a", device="B"), P(op="b", device="A", status="noisy"), P(op="c", device="B", status="oom"),
           P(op="d", kind="decode"), probe("copy", 4.0)]
    r = results.Run(tmp_path / "dir", {"run_id": "rid"}, pts)
    assert r.run_id == "rid"
    assert results.Run(tmp_path / "dir", {"run_id": ""}, []).run_id == "dir"
    assert results.Run(tmp_path / "dir", {}, []).run_id == "dir"
    assert r.device == "A, B"
    assert results.Run(tmp_path, {}, [P(device="")]).device == "unknown device"
    env = {"environment": {"device": {"name": "H200"}, "datasheet": {"id": "h200-sxm"}}}
    assert results.Run(tmp_path, env, pts).device == "H200"
    assert results.Run(tmp_path, {"environment": {"device": {"name": ""}}}, pts).device == "A, B"
    assert results.Run(tmp_path, {"environment": None}, pts).device == "A, B"
    assert results.Run(tmp_path, {"environment": {"device": None}}, pts).device == "A, B"
    assert results.Run(tmp_path, env, []).hardware_id == "h200-sxm"
    assert results.Run(tmp_path, {"environment": {"datasheet": "h100-sxm"}}, []).hardware_id == "h100-sxm"
    assert results.Run(tmp_path, {"environment": None}, []).hardware_id is None
    assert r.hardware_id is None
    assert [p["op"] for p in r.usable("kernel")] == ["a", "b"]
    assert r.usable("prefill") == []
    assert r.by_key() == {results.point_key(p): p for p in pts}
    assert r.ceilings == {"copy_gbps": 4.0, "read_gbps": None, "matvec_gbps": {}, "matmul_tflops": {}}


# --- JSON helpers -----------------------------------------------------------------------------------------------------

class Scalar:
    def item(self):
        return 2.5


def test_jsonable_and_clean_floats():
    assert results.jsonable({"t": (1, 2), "s": Scalar(), "p": Path("a")}) == {"t": [1, 2], "s": 2.5, "p": "a"}
    assert results._json_safe(Scalar()) == 2.5 and results._json_safe(Path("b")) == "b"
    inf = float("inf")
    assert results.clean_floats({"a": float("nan"), "b": inf, "c": -inf, "d": 1.5, "e": "nan", "f": 1}) == \
        {"a": None, "b": None, "c": None, "d": 1.5, "e": "nan", "f": 1}


def test_writer_checks_the_folder_again_under_the_lock(tmp_path, monkeypatch):
    """Another writer may finish a run in the folder between the first look and the lock: refused, lock let go."""
    run = tmp_path / "run"

    class RaceLock(results.RunLock):
        def acquire(self):
            got = super().acquire()
            (run / "points.jsonl").write_text("")  # what the other writer left
            return got
    monkeypatch.setattr(results, "RunLock", RaceLock)
    with pytest.raises(ConfigError) as e:
        results.RunWriter(run, MANIFEST)
    assert err(e) == (str(run), None, "run folder already has points; use --resume or another --out")
    assert not (run / ".lock").exists() and not (run / "manifest.json").exists()


def test_a_failed_append_names_the_points_file(tmp_path, monkeypatch):
    from tokenfleet import files

    run = tmp_path / "run"
    with results.RunWriter(run, MANIFEST) as w:
        def full(fd, data):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(files, "_write_all", full)
        with pytest.raises(ConfigError) as e:
            w.append({"kind": "kernel", "op": "a", "status": "ok"})
    assert e.value.file == str(run / "points.jsonl")
    record = {"schema_version": 1, "run_id": "r1", "kind": "kernel", "op": "a", "status": "ok"}
    size = len(json.dumps(record)) + 1  # the line and its newline: 83 bytes
    assert e.value.message.startswith(f"could not write {size} B: No space left on device (")
    assert (run / "points.jsonl").read_bytes() == b""
