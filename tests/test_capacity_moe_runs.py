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


def ep_run(dst: Path, ep: int = 8) -> Path:
    """A runner-written folder whose only qwen3-30b-a3b points are EP slices (`ep`, one GPU of the pool) with their
    routed-expert time `expert_ms` over a token range a mixed pool's step falls in (decode and prefill points)."""
    moe_run(dst)
    pts = [json.loads(ln) for ln in (dst / "points.jsonl").read_text().splitlines()]
    decode = next(p for p in pts if p.get("kind") == "decode")
    keep = [p for p in pts if p.get("kind") != "decode"]
    for b in (1, 8, 64, 256):
        keep.append({**decode, "batch": b, "context": 1024, "ep": ep, "expert_ms": 0.02 + 0.001 * b})
        keep.append({**keep[-1], "ep_rank": 1, "expert_ms": 0.02 + 0.003 * b})  # a busier rank: the mean is taken
        keep.append({**keep[-1], "backend": "torch", "expert_ms": 1.0 + 0.003 * b})  # slower backend: not used
    for n in (1024, 16384):
        keep.append({**decode, "kind": "prefill", "batch": 1, "prompt_len": n, "ep": ep, "expert_ms": 0.02 + 0.001 * n})
        keep[-1].pop("context")
    (dst / "points.jsonl").write_text("".join(json.dumps(p) + "\n" for p in keep))
    return dst


def test_ep_slice_points_give_the_ep_pools_a_measured_expert_time(tmp_path):
    from tokenfleet.capacity.expert import PoolStep, measured_experts
    from tokenfleet.capacity.pools import project_deployment
    from tokenfleet.hardware import load_hardware

    runs = read_runs([ep_run(tmp_path / "ep")])
    assert measured_for(runs, "h200", MOE, "bf16", 1) is None  # a slice is not the whole model's grid
    curve = measured_experts(runs, "h200", MOE, 8, "bf16")
    assert curve is not None and curve.tokens == [1, 8, 64, 256, 1024, 16384] and "ep 8" in curve.label
    assert curve(64) == pytest.approx((0.02 + 0.002 * 64) * 1e-3) and "2 rank(s)" in curve.label
    assert measured_experts(runs, "h200", MOE, 4, "bf16") is None and measured_experts(runs, "h100-sxm", MOE, 8,
                                                                                       "bf16") is None
    cfg, hw = load_model_config(MOE), load_hardware("h200")
    plain = PoolStep(cfg, hw, "bf16", "bf16", ep=8, overlap=False).step(64, 1024)
    ps = PoolStep(cfg, hw, "bf16", "bf16", ep=8, overlap=False, experts=curve)
    timed = ps.step(64, 1024)
    assert "experts_source" not in plain and timed["experts_source"] == curve.label
    # the router and shared experts by the roofline, the routed experts as measured, per MoE layer
    nl = cfg.num_moe_layers
    other_w = nl * (cfg.moe.shared_experts * cfg.expert_params + cfg.router_params())
    assert timed["moe_s"] == pytest.approx(ps._t(2 * 64 * other_w, other_w * ps.wb, ps.mm_peak) + nl * curve(64))
    assert timed["moe_s"] != plain["moe_s"]
    outside = PoolStep(cfg, hw, "bf16", "bf16", ep=8, overlap=False, experts=curve).step(0, 0, 40000, 10, 2000, 4000)
    assert "experts_source" not in outside  # beyond the measured tokens: the roofline
    res = project_deployment(MOE, "h200", "chat", "qwen3-moe-dp-ep8", "bf16", runs=runs)
    assert res["pools"]["mixed"]["experts_source"] == curve.label
    assert project_deployment(MOE, "h200", "chat", "qwen3-moe-dp-ep8", "bf16")["pools"]["mixed"][
        "experts_source"] == "roofline"
    res = CliRunner().invoke(app, ["project", "-m", MOE, "-g", "h200", "--dtype", "bf16", "--deployment",
                                   "qwen3-moe-dp-ep8", "--run", str(tmp_path / "ep")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"routed experts: {curve.label}" in " ".join(res.output.split())
