"""Routing replayed from a file (model.replay, the `replay` routing of MoE model points): the committed tiny file,
its validation (one line naming file and field; exit 2 at the CLI), the label with the file's hash, and a point that
routes by the file's per-layer popularity."""

from __future__ import annotations

import hashlib

import pytest
import torch
import yaml
from conftest import REPO, invoke_cli
from tokenfleet.config import ConfigError
from tokenfleet.measure.parts import model as part
from tokenfleet.measure.runner import execute
from tokenfleet.model import decoder as M
from tokenfleet.model import replay as R
from tokenfleet.results import USABLE

TINY = REPO / "configs" / "routing" / "tiny-skewed.yaml"
GOOD = """id: x
description: d
source: s
experts: 4
topk: 2
layers:
  - histogram: [3, 1, 0, 0]
"""


def test_the_committed_file_loads_with_its_hash():
    r = R.load_replay("tiny-skewed")
    sha = hashlib.sha256(TINY.read_bytes()).hexdigest()
    assert r.sha256 == sha and r.label == f"replay:tiny-skewed@{sha[:12]}"
    h = r.histograms()
    assert h.shape == (2, 8) and h[0].tolist() == [40, 20, 10, 5, 3, 1, 1, 0]
    assert h[1].sum() == 8 * 2 and h[1].argmax() == 3  # the tokens layer, counted
    skew = R.replay_skew(r, 2, 8, 2, "cpu")  # ln p per layer; an expert never chosen: half a pair's share
    assert skew.shape == (2, 8) and skew[0, 0] == pytest.approx(-0.6931, abs=1e-4)
    assert skew[0, 7] == pytest.approx(float(torch.tensor(0.5 / 80).log()))


@pytest.mark.parametrize("edit, field", [
    (("[3, 1, 0, 0]", "[3, 1, 0]"), "layers.0.histogram"),
    (("[3, 1, 0, 0]", "[0, 0, 0, 0]"), "layers.0.histogram"),
    (("- histogram: [3, 1, 0, 0]", "- tokens: [[0, 1], [2, 2]]"), "layers.0.tokens.1"),
    (("- histogram: [3, 1, 0, 0]", "- tokens: [[0, 4]]"), "layers.0.tokens.0"),
    (("- histogram: [3, 1, 0, 0]", "- {histogram: [1, 1, 1, 1], tokens: [[0, 1]]}"), "layers.0"),
    (("- histogram: [3, 1, 0, 0]", "- {}"), "layers.0"),
    (("topk: 2", "topk: 5"), "topk"),
    (("topk: 2", "topk: 2\nweights: 1"), "weights"),
    (("layers:\n  - histogram: [3, 1, 0, 0]\n", "layers: []\n"), "layers"),
])
def test_a_bad_file_is_one_line_naming_file_and_field(tmp_path, edit, field):
    path = tmp_path / "x.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as err:
        R.load_replay(str(path))
    assert err.value.file == str(path) and err.value.field == field and "\n" not in str(err.value)


def test_a_file_must_fit_the_model(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(GOOD)
    r = R.load_replay(str(path))
    assert R.replay_skew(r, 5, 4, 2, "cpu").shape == (5, 4)  # one layer: every MoE layer
    for args, field in (((5, 8, 2), "experts"), ((5, 4, 1), "topk")):
        with pytest.raises(ConfigError, match="x.yaml") as err:
            R.replay_skew(r, *args, "cpu")
        assert err.value.field == field
    with pytest.raises(ConfigError) as err:
        R.replay_skew(R.load_replay("tiny-skewed"), 3, 8, 2, "cpu")  # two layers for three
    assert err.value.field == "layers"


def test_the_cli_exits_2_on_a_bad_replay_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("[3, 1, 0, 0]", "[3, 1]"))
    suite = tmp_path / "s.yaml"
    suite.write_text(f"""id: s
description: t
device: cpu
decode:
  models: [tiny-qwen3-moe]
  backends: [torch]
  dtypes: [fp32]
  context: [8]
  routing: {{kind: replay, file: {bad}}}
""")
    res = invoke_cli("bench", "--suite", str(suite), "--plan")
    assert res.exit_code == 2, res.output
    assert str(bad) in res.output and "layers.0.histogram" in res.output and "Traceback" not in res.output
    assert part.Routing().label == "router"
    with pytest.raises(ValueError, match="file"):
        part.Routing(kind="replay")


def test_a_replayed_point_routes_by_the_files_layers(ctx):
    spec = part.DecodeSpec(models=["tiny-deepseek-v3"], backends=["torch"], dtypes=["fp32"], batch=[32], context=[8],
                           routing={"kind": "replay", "file": "tiny-skewed"})
    (job,) = part.plan_decode(spec, ctx)
    label = R.load_replay("tiny-skewed").label
    assert job.key["routing"] == label
    p = execute(job, ctx)
    assert p["status"] in USABLE, p.get("error")
    assert f"routing: {label}" in p["note"]
    # per layer, the model's routers with the file's popularity: layer 0 mostly experts 0-2, layer 1 mostly 3, 5, 6
    built = part._Session().get(ctx, "tiny-deepseek-v3", "fp32", spec)
    x = torch.randint(0, 256, (64,))
    counts = M.expert_counts(built.model, lambda m: m.forward_prefill(x[None], None))
    assert counts[0, :3].sum() > 0.6 * counts[0].sum() and counts[1, [3, 5, 6]].sum() > 0.6 * counts[1].sum()
    plain = part._Session().get(ctx, "tiny-deepseek-v3", "fp32", part.DecodeSpec(models=["tiny-deepseek-v3"]))
    base = M.expert_counts(plain.model, lambda m: m.forward_prefill(x[None], None))
    assert base[0, :3].sum() < counts[0, :3].sum()


def test_a_kernel_point_replays_the_files_first_layer(ctx):
    """The moe kernel's routing `replay:<file>`: the point's key names the file's id and hash and carries its first
    layer's popularity, from which the tokens' experts are drawn (and checked against the reference as any draw)."""
    from tokenfleet.kernels import moe as K
    from tokenfleet.measure.parts import kernels as kp

    case = kp.OpCase(op="moe", dtypes=["fp32"], backends=["torch"], routing=["replay:tiny-skewed", "uniform"],
                     shapes=[{"tokens": 64, "hidden": 32, "inter": 16, "experts": 8, "topk": 2}])
    shapes = kp.case_shapes(case)
    label = R.load_replay("tiny-skewed").label
    assert [s["routing"] for s in shapes] == [label, "uniform"]
    assert shapes[0]["routing_hist"] == [40, 20, 10, 5, 3, 1, 1, 0] and "routing_hist" not in shapes[1]
    replayed, uniform = (K.point_fields(s, K.make_inputs(s, torch.float32, "cpu", 0)) for s in shapes)
    assert sum(replayed["tokens_per_expert"][:3]) > 0.6 * 128 > sum(uniform["tokens_per_expert"][:3])
    p = execute(kp.kernel_job("moe", shapes[0], "fp32", "torch", False), ctx)
    assert p["status"] in USABLE, p.get("error")
    assert p["routing"] == label and p["tokens_per_expert"] == replayed["tokens_per_expert"]
    with pytest.raises(ConfigError) as err:  # a file of other sizes than the shape's
        kp.case_shapes(kp.OpCase(op="moe", dtypes=["fp32"], routing=["replay:tiny-skewed"],
                                 shapes=[{"tokens": 4, "hidden": 32, "inter": 16, "experts": 16, "topk": 2}]))
    assert err.value.field == "experts" and "tiny-skewed.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="file not found"):
        kp.OpCase(op="moe", dtypes=["fp32"], routing=["replay:nowhere.yaml"], shapes=shapes[1:])


def test_mutated_routing_files_exit_0_or_2(tmp_path):
    """The committed file, broken in many ways (raw bytes, wrong types, removed and added keys: the fuzz test's
    mutations), read by `bench --plan` through a suite naming it: every case ends with exit 0 or one line and exit 2."""
    from test_inputs_fuzz import assert_clean_exit, mutations, raw_cases, sample

    text = TINY.read_text()
    cases = raw_cases(text) + [(label, yaml.safe_dump(d, sort_keys=False).encode())
                               for label, d in sample(mutations(yaml.safe_load(text)), 40)]
    for i, (label, data) in enumerate(cases):
        f = tmp_path / f"routing-{i}.yaml"
        f.write_bytes(data)
        suite = tmp_path / f"suite-{i}.yaml"
        suite.write_text(f"id: s\ndescription: t\ndevice: cpu\ndecode: {{models: [tiny-qwen3-moe], context: [8], "
                         f"routing: {{kind: replay, file: '{f}'}}}}\n")
        assert_clean_exit(invoke_cli("bench", "--suite", str(suite), "--plan", "-f", "json"), f"routing {label}")
