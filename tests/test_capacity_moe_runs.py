"""An MoE model's rows use a run's MoE points as dense rows use dense ones: `project --run` / `capacity --run` turn a
qwen3-30b-a3b row `measured` on the device the run measured (and `calibrated` elsewhere), from a runner-written run
folder; skewed-routing points are not the grid."""

import json
from pathlib import Path

import pytest
import yaml
from tokenfleet.capacity.calibrate import measured_for, read_runs
from tokenfleet.capacity.project import project
from tokenfleet.cli.main import app
from tokenfleet.model import decoder as M
from tokenfleet.model.spec import load_model_config
from typer.testing import CliRunner

REF = Path(__file__).resolve().parent.parent / "results" / "reference" / "h200-2026-11-28" / "quick" / "run"
MOE = "qwen3-30b-a3b"


def moe_run(dst: Path, routing: str = "router") -> Path:
    """The committed H200 quick run as a runner writes it, its decode points turned into qwen3-30b-a3b points (the
    model part's MoE fields: routing condition, experts touched per layer, tokens per expert; bytes of the experts
    touched): the folder layout, manifest and point schema are the runner's own."""
    import shutil

    shutil.copytree(REF, dst)
    cfg = load_model_config(MOE)
    pts = []
    for ln in (dst / "points.jsonl").read_text().splitlines():
        p = json.loads(ln)
        if p.get("kind") == "decode":
            touched = [min(128, 8 * p["batch"])] * cfg.num_moe_layers
            p.update(model=MOE, routing=routing,
                     experts_touched=touched, tokens_per_expert=[p["batch"] * 8 * 48 // 128] * 128,
                     bytes=M.decode_bytes(cfg, p["batch"], p["context"], 2, experts_touched=sum(touched)))
        elif p.get("kind") == "prefill":
            continue
        pts.append(p)
    (dst / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pts))
    return dst


def test_moe_row_is_measured_from_a_run(tmp_path):
    runs = read_runs([moe_run(tmp_path / "moe")])
    m = measured_for(runs, "h200", MOE, "bf16", 1)
    assert m is not None and m.decode
    (batch, context), seconds = next(iter(sorted(m.decode.items())))
    r = project(MOE, "h200", "chat", "bf16", tp=1, runs=runs)
    assert r["source"] == "measured"
    assert project(MOE, "h100-sxm", "chat", "bf16", tp=1, runs=runs)["source"] == "calibrated"
    res = CliRunner().invoke(app, ["project", "-m", MOE, "-g", "h200", "--tp", "1", "--dtype", "bf16", "--format",
                                   "json", "--run", str(tmp_path / "moe")])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["source"] == "measured"


def test_capacity_run_turns_the_moe_row_measured(tmp_path):
    fleet = {"id": "moe-h200", "description": "t",
             "gpus": [{"gpu": "h200", "count": 8, "assumption": True, "reason": "test"}],
             "models": [{"model": MOE, "share": 1.0, "dtype": "bf16"}],
             "workloads": [{"workload": "chat", "share": 1.0}]}
    path = tmp_path / "moe-h200.yaml"
    path.write_text(yaml.safe_dump(fleet))
    args = ["capacity", "--fleet", str(path), "--format", "json"]
    before = CliRunner().invoke(app, args)
    after = CliRunner().invoke(app, [*args, "--run", str(moe_run(tmp_path / "moe"))])
    assert before.exit_code == 0 and after.exit_code == 0, before.output + after.output
    row = json.loads(after.stdout)["rows"][0]  # the h200 row (then the fleet's total), serving only qwen3-30b-a3b
    assert row["gpu"] == "h200" and row["source"] == "measured" and row["tp"] == f"{MOE}:1"
    assert json.loads(before.stdout)["rows"][0]["source"] == "projected"


def test_skewed_routing_points_are_not_the_grid(tmp_path):
    runs = read_runs([moe_run(tmp_path / "zipf", routing="zipf-1.2")])
    assert measured_for(runs, "h200", MOE, "bf16", 1) is None
    assert project(MOE, "h200", "chat", "bf16", tp=1, runs=runs)["source"] != "measured"


def test_touched_experts_bound_the_bytes():
    cfg = load_model_config(MOE)
    every = M.decode_bytes(cfg, 64, 1024, 2, experts_touched=48 * 128)
    # batch 1 touches k experts a layer under any routing; batch 64 under skew touches fewer than uniform expects
    assert M.decode_bytes(cfg, 1, 1024, 2, experts_touched=48 * 8) == pytest.approx(M.decode_bytes(cfg, 1, 1024, 2))
    assert M.decode_bytes(cfg, 64, 1024, 2, experts_touched=48 * 40) < M.decode_bytes(cfg, 64, 1024, 2) < every
