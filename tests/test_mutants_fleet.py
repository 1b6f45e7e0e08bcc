"""Oracles for tokenfleet.capacity.fleet (`make mutate`'s survivors): a two-type, two-class fleet over a fake
projection whose per-class rates are chosen, so that λ, each row's tokens/day, coverage, power, GPUs needed, the
low/high span, the growth fit and the outgrow dates are worked out by hand; what each GPU type is asked to project
(dtype, tp, deployment, KV dtype, batch cap, offline limits); the fleet file's validation (file and field named);
utilization and peak-factor bounds; demand given on the command line; and the China figures (14T reported beside
the 140T primary, and the note why they differ). Values are not computed by the code under test."""

import datetime as dt
import math

import pytest
import yaml
from tokenfleet.capacity import fleet as F
from tokenfleet.capacity.calibrate import efficiency_from_runs
from tokenfleet.capacity.config import Demand, Fleet
from tokenfleet.config import ConfigError, config_dir, known_names

DAY = 86400
JAN1 = dt.date(2026, 1, 1)

# ---- a fake projection: chosen rates per (GPU type, workload), fp8 twice the rate -------------------------------
RATES = {("h100-sxm", "chat"): 4.0, ("h100-sxm", "reasoning"): 2.0, ("h20", "chat"): 2.0, ("h20", "reasoning"): 3.0}
GAIN = {None: 1.0, "fp16": 1.0, "bf16": 1.0, "fp8": 2.0}
EXTRA = {  # what else each class's projection says
    ("h100-sxm", "chat"): dict(source="measured", tpot_ok=False, extrapolated=True, power_w_per_gpu=None,
                               efficiency_source="measured"),
    ("h100-sxm", "reasoning"): dict(source="measured", tpot_ok=False, extrapolated=True, power_w_per_gpu=700.0,
                                    efficiency_source="family default", efficiency={"compute": 0.5, "memory": 0.7}),
    ("h20", "chat"): dict(source="projected", ttft_ok=False, power_w_per_gpu=400.0),
    ("h20", "reasoning"): dict(source="projected", ttft_ok=False, power_w_per_gpu=450.0),
}
AUTO_TP = {"chat": 4, "reasoning": 8}  # what auto_tp picks


class FakeProjection:
    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(F, "project", lambda model, gpu, w, dtype, **kw: self.result("project", model, gpu, w,
                                                                                         dtype, kw))
        monkeypatch.setattr(F, "auto_tp", lambda model, gpu, w, dtype, **kw: self.result("auto_tp", model, gpu, w,
                                                                                         dtype, kw))
        monkeypatch.setattr(F, "project_deployment", lambda model, gpu, w, dep, dtype, **kw: self.result(
            "deployment", model, gpu, w, dtype, {**kw, "deployment": dep}))

    def result(self, how, model, gpu, w, dtype, kw):
        self.calls.append(dict(how=how, model=model, gpu=gpu, workload=w, dtype=dtype, **kw))
        r = {"model": model, "workload": w.id, "fits": True, "tp": kw.get("tp") or AUTO_TP.get(w.id, 1),
             "tokens_per_s_per_gpu": RATES.get((gpu, w.id), 1.0) * GAIN[dtype], "ttft_ok": True, "tpot_ok": True}
        return {**r, **EXTRA.get((gpu, w.id), {"source": "projected"})}


def demand(id_: str, *points: tuple[dt.date, float], why: str = "why") -> Demand:
    return Demand.model_validate(dict(
        id=id_, description="d", metric="m", kind="primary", counts="total", counts_note="n", why_differs=why,
        points=[dict(date=d, tokens_per_day=v, statement="s", source="src") for d, v in points]))


# demand doubles in 30 days: 1e6 -> 2e6 tokens/day; the China pair replaced by figures a hand can fit
SCENARIO = demand("scenario", (JAN1, 1e6), (JAN1 + dt.timedelta(30), 2e6), why="the scenario's own note")
REPORTED = demand("china-reported", (JAN1, 1e7), (JAN1 + dt.timedelta(30), 4e7), why="reported note")
PRIMARY = demand("china-nda", (JAN1 - dt.timedelta(30), 5e7), (JAN1, 1e8), why="primary note")


@pytest.fixture
def fake(monkeypatch):
    real = F.load_demand
    monkeypatch.setattr(F, "load_demand", lambda name: {"china-reported": REPORTED, "china-nda": PRIMARY}.get(
        name) or real(name))
    return FakeProjection(monkeypatch)


def two_types(**kw) -> Fleet:
    """h100 ×10 at tp 2, h20 ×10 (published 5..20) at auto tp; one model (fp16), chat and reasoning half each."""
    base = dict(
        id="two", description="t",
        gpus=[{"gpu": "h100-sxm", "count": 10, "tp": 2, "source": "s"},
              {"gpu": "h20", "count": 10, "count_range": {"low": 5, "high": 20, "source": "r"}, "assumption": True,
               "reason": "guess"}],
        utilization=0.5, peak_factor=2.0, pue=1.25, kv_dtype="fp8", batch_cap=64, max_batched_tokens=4096,
        models=[{"model": "llama-3.1-8b", "share": 1.0, "dtype": "fp16"}],
        workloads=[{"workload": "chat", "share": 0.5}, {"workload": "reasoning", "share": 0.5}],
        assumptions={k: "t" for k in ("utilization", "peak_factor", "pue", "kv_dtype", "batch_cap",
                                      "max_batched_tokens")})
    return Fleet.model_validate({**base, **kw})


# Routing by hand: supplies h100 (chat 40, reasoning 20), h20 (20, 30). h20 is relatively better at reasoning:
# all its time there (30); h100 gives reasoning t: 40(1−t) = 20t + 30 → t = 1/6, each class 100/3 → λ = 200/3.
LAM, H100_PART, H20_PART = 200 / 3, 40 * 5 / 6 + 20 / 6, 30.0
# low (h20 ×5: 10, 15): 40(1−t) = 20t + 15 → t = 5/12 → λ = 140/3; high (h20 ×20: 40, 60): h100 all chat (40),
# h20 gives chat s: 40 + 40s = 60(1−s) → s = 1/5 → 48 each → λ = 96.
LAM_LOW, LAM_HIGH = 140 / 3, 96.0


def test_capacity_rows_by_hand(fake):
    rows, s = F.capacity_table(two_types(), SCENARIO)
    h100, h20, total = rows
    u, pf, pue, need = 0.5, 2.0, 1.25, 2e6 * 2.0
    assert [r["gpu"] for r in rows] == ["h100-sxm", "h20", "total"]
    cap = LAM * DAY * u
    assert total["tokens_per_day"] == pytest.approx(cap, rel=1e-9) and total["count"] == 20
    assert h100["tokens_per_day"] == pytest.approx(H100_PART * DAY * u, rel=1e-9)
    assert h20["tokens_per_day"] == pytest.approx(H20_PART * DAY * u, rel=1e-9)
    assert h100["tokens_per_s_per_gpu"] == pytest.approx(H100_PART / 10, rel=1e-9)
    assert h100["tokens_per_day_per_gpu"] == pytest.approx(H100_PART / 10 * DAY * u, rel=1e-9)
    # alone: the harmonic mean by share of a type's own rates
    assert h100["alone_tokens_per_s_per_gpu"] == pytest.approx(1 / (0.5 / 4 + 0.5 / 2), rel=1e-12)
    assert h20["alone_tokens_per_s_per_gpu"] == pytest.approx(1 / (0.5 / 2 + 0.5 / 3), rel=1e-12)
    assert h100["gpus_needed_alone"] == math.ceil(need / (8 / 3 * DAY * u)) == 35
    assert h20["gpus_needed_alone"] == math.ceil(need / (2.4 * DAY * u)) == 39
    for r in (h100, h20, total):
        assert r["capacity_over_demand"] == pytest.approx(r["tokens_per_day"] / 2e6, rel=1e-12)
        assert r["coverage"] == pytest.approx(r["tokens_per_day"] / need, rel=1e-12)
        assert r["coverage_vs_china_reported"] == pytest.approx(r["tokens_per_day"] / (4e7 * pf), rel=1e-12)
        assert r["coverage_vs_china_nda"] == pytest.approx(r["tokens_per_day"] / (1e8 * pf), rel=1e-12)
    # power: the first class that states one (h100: reasoning's 700 W; h20: chat's 400 W), × count × PUE
    assert h100["power_mw"] == pytest.approx(10 * 700 * pue / 1e6, rel=1e-12)
    assert h20["power_mw"] == pytest.approx(10 * 400 * pue / 1e6, rel=1e-12)
    assert h100["energy_mwh_per_day"] == pytest.approx(10 * 700 * pue / 1e6 * 24, rel=1e-12)
    assert total["power_mw"] == pytest.approx(10 * 1100 * pue / 1e6, rel=1e-12)
    assert total["energy_mwh_per_day"] == pytest.approx(10 * 1100 * pue / 1e6 * 24, rel=1e-12)
    assert h100["joules_per_token"] == pytest.approx(700 * pue / (H100_PART / 10 * u), rel=1e-9)
    assert total["joules_per_token"] == pytest.approx(10 * 1100 * pue * DAY / cap, rel=1e-9)
    # labels
    assert (h100["count"], h100["count_source"], h100["count_low"], h100["count_high"]) == (10, "s", None, None)
    assert (h20["count_source"], h20["count_low"], h20["count_high"]) == ("assumption: guess", 5, 20)
    assert (h100["tp"], h20["tp"]) == ("llama-3.1-8b:2", "llama-3.1-8b:4,llama-3.1-8b:8")
    assert (h100["source"], h20["source"], total["source"]) == ("measured", "projected", "mixed")
    assert h100["efficiency_source"] == "family default, measured" and h20["efficiency_source"] == ""
    assert (h100["e_c"], h100["e_m"], h20["e_c"], h20["e_m"]) == (0.5, 0.7, None, None)
    both = "llama-3.1-8b/chat, llama-3.1-8b/reasoning"
    assert (h100["tpot_missed"], h100["ttft_missed"], h100["extrapolated"]) == (both, "", both)
    assert (h20["ttft_missed"], h20["tpot_missed"], h20["extrapolated"]) == (both, "", "")
    assert h100["unservable"] == h20["unservable"] == total["unservable"] == ""
    assert set(total) == {"gpu", "count", "tokens_per_day", "capacity_over_demand", "coverage",
                          "coverage_vs_china_reported", "coverage_vs_china_nda", "power_mw", "energy_mwh_per_day",
                          "joules_per_token", "source", "unservable"}
    assert set(F.CAPACITY_COLUMNS) <= set(h100)


def test_capacity_summary_by_hand(fake):
    _, s = F.capacity_table(two_types(), SCENARIO)
    cap, pf = LAM * DAY * 0.5, 2.0
    assert s["capacity_tokens_per_day"] == pytest.approx(cap, rel=1e-9)
    assert s["capacity_low_tokens_per_day"] == pytest.approx(LAM_LOW * DAY * 0.5, rel=1e-9)
    assert s["capacity_high_tokens_per_day"] == pytest.approx(LAM_HIGH * DAY * 0.5, rel=1e-9)
    assert (s["counts_with_range"], s["gpus_low"], s["gpus_high"]) == (["h20"], 15, 30)
    assert (s["fleet"], s["demand"], s["demand_tokens_per_day"], s["demand_date"]) == \
        ("two", "scenario", 2e6, JAN1 + dt.timedelta(30))
    assert (s["demand_counts"], s["demand_counts_note"], s["utilization"], s["peak_factor"], s["pue"]) == \
        ("total", "n", 0.5, 2.0, 1.25)
    assert s["coverage"] == pytest.approx(cap / (2e6 * pf), rel=1e-9)
    assert s["coverage_vs_china_reported"] == pytest.approx(cap / (4e7 * pf), rel=1e-9)
    assert s["coverage_vs_china_nda"] == pytest.approx(cap / (1e8 * pf), rel=1e-9)
    assert "capacity_over_demand" not in s
    assert (s["china_reported_tokens_per_day"], s["china_nda_tokens_per_day"]) == (4e7, 1e8)
    assert s["why_differs"] == "the scenario's own note"  # a scenario other than the China pair: its own note
    # growth: doubling in 30 days
    assert s["growth_per_month"] == pytest.approx(2 ** (365.25 / 12 / 30) - 1, rel=1e-9)
    assert s["doubling_months"] == pytest.approx(30 / (365.25 / 12), rel=1e-9)
    assert s["growth_fit"] == "log-linear fit of 2 points 2026-01-01 .. 2026-01-31"
    # demand × 2 reaches cap when 1e6·2^(d/30)·2 = cap: d = 30·log2(cap/2e6)
    on = JAN1 + dt.timedelta(round(30 * math.log2(cap / 2e6)))
    assert s["outgrows_fleet_on"] == on == dt.date(2026, 1, 17)
    assert s["demand_outgrows_fleet"] == f"already: the latest dated demand × peak factor is above the fleet " \
                                         f"(fitted crossing {on})"
    # the reported pair quadruples in 30 days from 1e7; the primary doubles in 30 days to 1e8 on Jan 1
    assert s["outgrows_fleet_on_china_reported"] == JAN1 + dt.timedelta(round(15 * math.log2(cap / 2e7)))
    assert s["outgrows_fleet_on_china_nda"] == JAN1 + dt.timedelta(round(30 * math.log2(cap / 2e8)))
    assert s["counted_tokens"] == "chat: total; reasoning: total"
    assert s["efficiency"] == efficiency_from_runs([]).to_dict()
    assert (s["fleet_file"], s["assumptions"], s["deployments"], s["offline"]) == \
        (None, {k: "t" for k in ("utilization", "peak_factor", "pue", "kv_dtype", "batch_cap",
                                 "max_batched_tokens")}, {}, False)


def test_what_each_type_is_asked_to_project(fake):
    F.capacity_table(two_types(), SCENARIO)
    calls = fake.calls[:4]  # the central counts' projections (one per type and class)
    assert [(c["how"], c["gpu"], c["workload"].id) for c in calls] == [
        ("project", "h100-sxm", "chat"), ("project", "h100-sxm", "reasoning"),
        ("auto_tp", "h20", "chat"), ("auto_tp", "h20", "reasoning")]
    for c in calls:
        assert (c["model"], c["dtype"], c["weight_only_fp8"], c["kv_dtype"], c["batch_cap"],
                c["max_batched_tokens"], c["runs"]) == ("llama-3.1-8b", "fp16", True, "fp8", 64, 4096, [])
        assert (c["workload"].ttft_ms, c["workload"].tpot_ms) != (1e9, 1e9)
    assert calls[0]["tp"] == 2 and "tp" not in calls[2]
    assert len(fake.calls) == 4  # projected once; the low/high span reuses them


def test_offline_lifts_the_latency_limits_and_a_dtype_overrides_the_fleets(fake):
    rows, s = F.capacity_table(two_types(), SCENARIO, offline=True, dtype="fp8")
    assert {(c["workload"].ttft_ms, c["workload"].tpot_ms, c["dtype"]) for c in fake.calls} == {(1e9, 1e9, "fp8")}
    assert s["offline"] is True
    assert s["capacity_tokens_per_day"] == pytest.approx(2 * LAM * DAY * 0.5, rel=1e-9)  # fp8: every rate ×2


def test_a_deployment_serves_its_model_on_its_gpus(fake):
    f = two_types(deployments=[{"model": "llama-3.1-8b", "deployment": "qwen3-moe-dp-ep8", "gpus": ["h20"],
                                "source": "s"}])
    _, s = F.capacity_table(f, SCENARIO)
    dep = [c for c in fake.calls if c["how"] == "deployment"]
    assert [(c["gpu"], c["workload"].id) for c in dep] == [("h20", "chat"), ("h20", "reasoning")]
    for c in dep:
        assert c["model"] == "llama-3.1-8b"
        assert (c["deployment"], c["dtype"], c["weight_only_fp8"], c["batch"], c["max_batched_tokens"],
                c["kv_dtype"], c["runs"]) == ("qwen3-moe-dp-ep8", "fp16", True, 64, 4096, "fp8", [])
    assert [c["how"] for c in fake.calls[:2]] == ["project", "project"]  # h100: not in the deployment's gpus
    assert s["deployments"] == {"llama-3.1-8b": "qwen3-moe-dp-ep8"}


def test_utilization_and_peak_factor_bounds(fake):
    for u in (1.0, 1e-9):
        F.capacity_table(two_types(), SCENARIO, utilization=u)
    for u in (0.0, -0.1, 1.0001):
        with pytest.raises(ConfigError) as e:
            F.capacity_table(two_types(), SCENARIO, utilization=u)
        assert (e.value.file, e.value.field, e.value.message) == ("--utilization", "utilization",
                                                                  f"must be in (0, 1], got {u}")
    _, s = F.capacity_table(two_types(), SCENARIO, peak_factor=1.0)
    assert s["peak_factor"] == 1.0 and s["coverage"] == pytest.approx(LAM * DAY * 0.5 / 2e6, rel=1e-9)
    with pytest.raises(ConfigError) as e:
        F.capacity_table(two_types(), SCENARIO, peak_factor=0.999)
    assert (e.value.file, e.value.field, e.value.message) == ("--peak-factor", "peak_factor", "must be ≥ 1, got 0.999")
    # the fleet's own utilization and peak factor unless given
    _, s = F.capacity_table(two_types(), SCENARIO, utilization=0.25)
    assert (s["utilization"], s["peak_factor"]) == (0.25, 2.0)
    assert s["capacity_tokens_per_day"] == pytest.approx(LAM * DAY * 0.25, rel=1e-9)


def test_a_named_fleets_bounds_name_its_file():
    path = str(F.fleet_of("h100-node")[1])
    assert path.endswith("configs/fleets/h100-node.yaml")
    with pytest.raises(ConfigError) as e:
        F.capacity_table("h100-node", utilization=1.5)
    assert (e.value.file, e.value.field) == (path, "utilization")
    with pytest.raises(ConfigError) as e:
        F.capacity_table("h100-node", peak_factor=0.5)
    assert (e.value.file, e.value.field, e.value.message) == (path, "peak_factor", "must be ≥ 1, got 0.5")


def test_china_figures_14t_reported_beside_140t_primary(monkeypatch):
    """The real demand files (the projection faked: rates are not the point here): coverage is shown against the
    reported 14T/day and the primary 140T/day, with the note why they differ (万亿 read as 10^11 in English)."""
    FakeProjection(monkeypatch)
    _, s = F.capacity_table("h100-node")
    assert (s["demand"], s["china_reported_tokens_per_day"], s["china_nda_tokens_per_day"]) == \
        ("china-reported", 1.4e13, 1.4e14)
    cap, pf = s["capacity_tokens_per_day"], 1.5
    # 8 GPUs, one class mix chat ½ (4 tok/s), baseline-1k1k 0.3 and summarize-8k 0.2 (1 tok/s): 1/(½/4 + ½) = 1.6 each
    assert cap == pytest.approx(8 * 1.6 * DAY * 0.6, rel=1e-9)
    assert s["coverage_vs_china_reported"] == pytest.approx(cap / (1.4e13 * pf), rel=1e-12)
    assert s["coverage_vs_china_nda"] == pytest.approx(cap / (1.4e14 * pf), rel=1e-12)
    assert s["coverage"] == s["coverage_vs_china_reported"]
    assert "140万亿 = 140 trillion, not 14" in s["why_differs"]
    assert s["fleet_file"] == "configs/fleets/h100-node.yaml" and s["pue"] == 1.3


@pytest.mark.parametrize("name", ["china-reported", "china-nda", "custom"])
def test_the_china_pair_and_a_given_figure_carry_the_reported_note(fake, name):
    d = demand(name, (JAN1, 5e6), why="its own")
    _, s = F.capacity_table(two_types(), d)
    assert s["why_differs"] == "reported note"


def test_demand_given_on_the_command_line():
    d = F.fixed_demand(2.5e12)
    assert (d.id, d.description, d.metric, d.kind, d.counts, d.counts_note, d.why_differs) == (
        "custom", "given on the command line", "tokens_per_day", "primary", "unknown", "given on the command line",
        "a figure given on the command line")
    (p,) = d.points
    assert (p.date, p.tokens_per_day, p.statement, p.source) == (dt.date.today(), 2.5e12, "--demand-tokens-per-day",
                                                                 "command line")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError) as e:
            F.fixed_demand(bad)
        assert (e.value.file, e.value.field, e.value.message) == ("--demand-tokens-per-day", None,
                                                                  f"must be positive, got {bad}")
    assert F.demand_of("china-nda", 3e9).latest.tokens_per_day == 3e9  # a figure wins over a name
    assert F.demand_of(SCENARIO) is SCENARIO
    assert F.demand_of(None).id == "china-reported" and F.demand_of("china-nda").id == "china-nda"
    assert F.demand_of(None, 7.0).id == "custom"
    assert F.fixed_demand(0.5).latest.tokens_per_day == 0.5  # any positive figure


def test_growth_fit_by_hand():
    assert F.growth_fit(demand("one", (JAN1, 1e8))) is None  # one point
    fit = F.growth_fit(SCENARIO)
    b = math.log(2) / 30
    assert fit["per_day"] == pytest.approx(b, rel=1e-9)
    assert fit["intercept"] == pytest.approx(math.log(1e6) - b * JAN1.toordinal(), rel=1e-9)
    assert fit["growth_per_month"] == pytest.approx(2 ** (365.25 / 12 / 30) - 1, rel=1e-9)
    assert fit["doubling_months"] == pytest.approx(30 * 12 / 365.25, rel=1e-9)
    assert fit["from"] == "log-linear fit of 2 points 2026-01-01 .. 2026-01-31"
    falling = F.growth_fit(demand("f", (JAN1, 2e6), (JAN1 + dt.timedelta(30), 1e6)))
    assert falling["per_day"] == pytest.approx(-b, rel=1e-9) and falling["doubling_months"] is None
    assert falling["growth_per_month"] == pytest.approx(0.5 ** (365.25 / 12 / 30) - 1, rel=1e-9)
    three = F.growth_fit(demand("3", (JAN1, 1e6), (JAN1 + dt.timedelta(30), 2e6), (JAN1 + dt.timedelta(60), 4e6)))
    assert three["from"] == "log-linear fit of 3 points 2026-01-01 .. 2026-03-02"
    assert three["per_day"] == pytest.approx(b, rel=1e-9)
    flat = F.growth_fit(demand("flat", (JAN1, 1.0), (JAN1 + dt.timedelta(30), 1.0)))  # ln 1 = 0: a slope of 0.0
    assert flat["per_day"] == 0.0 and flat["doubling_months"] is None and flat["growth_per_month"] == 0.0


def test_outgrows_by_hand():
    fit = F.growth_fit(SCENARIO)  # 1e6 on Jan 1, doubling every 30 days
    assert F.outgrows(fit, 8e6, 2.0) == JAN1 + dt.timedelta(60)  # 8e6 / 2 = 4e6: two doublings
    assert F.outgrows(fit, 4e6, 1.0) == JAN1 + dt.timedelta(60)
    assert F.outgrows(fit, 1e6 * 2 ** (15.4 / 30), 1.0) == JAN1 + dt.timedelta(15)  # rounded to the nearest day
    assert F.outgrows(fit, 1e6 * 2 ** (15.6 / 30), 1.0) == JAN1 + dt.timedelta(16)
    assert F.outgrows(fit, 5e5, 1.0) == JAN1 - dt.timedelta(30)  # in the past: already exceeded
    assert F.outgrows(fit, 0.5, 1.0) == JAN1 + dt.timedelta(round(30 * math.log2(0.5e-6)))  # any positive capacity
    assert F.outgrows(None, 8e6, 1.0) is None and F.outgrows({}, 8e6, 1.0) is None
    assert F.outgrows(fit, 0.0, 1.0) is None and F.outgrows(fit, -1.0, 1.0) is None
    assert F.outgrows({**fit, "per_day": 0.0}, 8e6, 1.0) is None
    assert F.outgrows({**fit, "per_day": -1e-3}, 8e6, 1.0) is None
    slow = {**fit, "per_day": 1e-9}  # ×2.7 in 2.7 million years: dates out of the calendar are None
    assert F.outgrows(slow, 1e7, 1.0) is None and F.outgrows(slow, 1e5, 1.0) is None  # beyond 9999, before year 1
    assert F.outgrows({**fit, "per_day": 5e-324}, 1e7, 1.0) is None  # an infinite day count


def test_coverage_by_hand():
    c = F.coverage(6e6, d=SCENARIO, pf=1.5, reported=REPORTED, primary=PRIMARY)
    assert c == {"capacity_over_demand": 3.0, "coverage": 2.0, "coverage_vs_china_reported": pytest.approx(0.1),
                 "coverage_vs_china_nda": pytest.approx(0.04)}


def test_outgrown_states_and_statements():
    today, on = dt.date(2026, 5, 1), dt.date(2026, 7, 1)
    assert F.outgrown_state(0.99, on, today) == "already"
    assert F.outgrown_state(1.0, None, today) == "never"
    assert F.outgrown_state(1.0, today, today) == "by today"
    assert F.outgrown_state(1.0, today + dt.timedelta(1), today) == "later"
    assert F.outgrown_state(1.0, dt.date.today()) == "by today"  # today by default
    assert F.outgrown_state(1.0, dt.date.today() + dt.timedelta(1)) == "later"
    assert F.outgrown_statement(0.5, None, today) == "already: the latest dated demand × peak factor is above the fleet"
    assert F.outgrown_statement(0.5, on, today) == \
        "already: the latest dated demand × peak factor is above the fleet (fitted crossing 2026-07-01)"
    assert F.outgrown_statement(2.0, dt.date(2026, 3, 1), today) == \
        "by today: at the fitted growth, demand × peak factor passed the fleet on 2026-03-01"
    assert F.outgrown_statement(2.0, on, today) == "on 2026-07-01, at the fitted growth"
    assert F.outgrown_statement(2.0, None, today) == "not at the fitted growth (no fit, or demand not growing)"
    assert F.outgrown_statement(2.0, dt.date.today()).startswith("by today")


def test_routed_leaves_out_classes_no_type_holds():
    def mix(*rates):  # classes: (share, result); a rate of None: does not fit
        return {"classes": [(s, {"model": "m", "workload": w, "fits": r is not None, "tokens_per_s_per_gpu": r or 9.0})
                            for s, w, r in zip((0.25, 0.25, 0.5), ("a", "b", "c"), rates, strict=True)]}
    # class c (half the demand) fits nowhere: the mix is a and b, half each; one GPU each: a 2 + 2, b on type 1 at 3
    lam, parts, nobody = F.routed([mix(2.0, 3.0, None), mix(2.0, None, None)], [1, 1])
    assert nobody == ["m/c"]
    # by hand: type 2 serves a only (2); type 1 gives a t: 2t + 2 = 3(1 − t) → t = 1/5, each 2.4 → λ = 4.8
    assert lam == pytest.approx(4.8, rel=1e-9)
    assert parts == [pytest.approx(2.8, rel=1e-9), pytest.approx(2.0, rel=1e-9)]
    assert F.routed([mix(None, None, None)], [4]) == (0.0, [0.0], ["m/a", "m/b", "m/c"])
    assert F.routed([mix(None, None, None), mix(None, None, None)], [1, 1]) == (0.0, [0.0, 0.0],
                                                                                 ["m/a", "m/b", "m/c"])


def test_gpu_mix_rate_filters_and_labels(monkeypatch):
    results = {"a": dict(fits=True, tokens_per_s_per_gpu=0.5, tp=1, source="measured", ttft_ok=True, tpot_ok=True),
               "b": dict(fits=False, tokens_per_s_per_gpu=100.0, tp=8, source="projected", ttft_ok=False,
                         tpot_ok=False),  # does not fit: unservable, no rate, no labels
               "c": dict(fits=True, tokens_per_s_per_gpu=0.0, tp=2, source="projected", ttft_ok=False,
                         tpot_ok=False, power_w_per_gpu=300.0, efficiency_source="x", efficiency={"compute": 1},
                         extrapolated=True),  # fits at rate 0: neither served nor unservable
               "d": dict(fits=True, tokens_per_s_per_gpu=6.0, tp=1, source="measured", ttft_ok=True, tpot_ok=True)}
    monkeypatch.setattr(F, "auto_tp", lambda model, gpu, w, dtype, **kw: {"model": model, "workload": w.id,
                                                                          **results[w.id]})
    monkeypatch.setattr(F, "workload_of", lambda name, offline=False: F.Workload(
        id=name, description="w", input_len=1, output_len=1, ttft_ms=1, tpot_ms=1, count="total"))
    f = Fleet.model_validate(dict(id="f", description="d", gpus=[{"gpu": "h100-sxm", "count": 1, "source": "s"}],
                                  models=[{"model": "m", "share": 1.0}],
                                  workloads=[{"workload": w, "share": 0.25} for w in "abcd"]))
    mx = F.gpu_mix("h100-sxm", f, None, [])
    assert mx["rate"] == pytest.approx(0.5 / (0.25 / 0.5 + 0.25 / 6), rel=1e-12)  # a and d only, by their shares
    assert [s for s, _ in mx["classes"]] == [0.25] * 4
    assert (mx["unservable"], mx["tp"], mx["source"], mx["ttft_missed"], mx["tpot_missed"], mx["extrapolated"],
            mx["power_w"], mx["efficiency_source"], mx["efficiency"]) == (["m/b"], "m:1", "measured", [], [], [],
                                                                          None, "", None)
    results["d"]["source"] = "calibrated"
    assert F.gpu_mix("h100-sxm", f, None, [])["source"] == "mixed"
    for r in results.values():
        r["fits"] = False
    none = F.gpu_mix("h100-sxm", f, None, [])
    assert (none["rate"], none["source"], none["tp"], none["unservable"]) == (0.0, "projected", "",
                                                                             ["m/a", "m/b", "m/c", "m/d"])


def test_a_type_with_no_gpus_or_no_power(fake):
    f = two_types(gpus=[{"gpu": "h100-sxm", "count": 10, "tp": 2, "source": "s"},
                        {"gpu": "h20", "count": 0, "source": "s"}])
    rows, s = F.capacity_table(f, SCENARIO)
    h100, h20, total = rows
    # h100 alone: 40(1−t) = 20t → t = 2/3, each class 40/3 → λ = 80/3
    assert total["tokens_per_day"] == pytest.approx(80 / 3 * DAY * 0.5, rel=1e-9)
    assert (h20["tokens_per_s_per_gpu"], h20["tokens_per_day"], h20["joules_per_token"], h20["power_mw"]) == \
        (0.0, 0.0, None, 0.0)
    assert h20["gpus_needed_alone"] == 39  # counts do not matter to GPUs needed alone
    assert total["power_mw"] == pytest.approx(10 * 700 * 1.25 / 1e6, rel=1e-12)


def test_check_refs_names_file_and_field(tmp_path):
    def fleet_file(name="f.yaml", **kw):
        data = dict(id=name.removesuffix(".yaml"), description="x",
                    gpus=[{"gpu": "h100-sxm", "count": 8, "source": "t"}],
                    models=[{"model": "llama-3.1-8b", "share": 1.0}], workloads=[{"workload": "chat", "share": 1.0}])
        p = tmp_path / name
        p.write_text(yaml.safe_dump({**data, **kw}, allow_unicode=True))
        return str(p)

    cases = [
        (dict(gpus=[{"gpu": "h100-sxm", "count": 8, "source": "t"}, {"gpu": "h999", "count": 1, "source": "t"}]),
         "gpus.1.gpu", "unknown gpu 'h999'; known: "),
        (dict(models=[{"model": "nope", "share": 1.0}]), "models.0.model", "unknown model 'nope'; known: "),
        (dict(workloads=[{"workload": "chat", "share": 0.5}, {"workload": "nope", "share": 0.5}]),
         "workloads.1.workload", "unknown workload 'nope'; known: "),
        (dict(deployments=[{"model": "qwen3-8b", "deployment": "qwen3-moe-dp-ep8", "source": "s"}]),
         "deployments.0.model", "'qwen3-8b' is not one of the fleet's models"),
        (dict(deployments=[{"model": "llama-3.1-8b", "deployment": "nope", "source": "s"}]),
         "deployments.0.deployment", "unknown name 'nope'"),
        (dict(gpus=[{"gpu": "h100-sxm", "count": 8, "tp": 3, "source": "t"}]), "gpus.0.tp",
         "llama-3.1-8b: num_heads 32 is not divisible by tp 3"),
    ]
    for kw, field, message in cases:
        p = fleet_file(**kw)
        with pytest.raises(ConfigError) as e:
            F.fleet_of(p)
        assert (e.value.file, e.value.field) == (p, field) and message in e.value.message, (field, e.value)
    with pytest.raises(ConfigError) as e:
        F.fleet_of(fleet_file(gpus=[{"gpu": "h999", "count": 1, "source": "t"}]))
    assert e.value.message == f"unknown gpu 'h999'; known: {', '.join(known_names('hardware'))}"
    # a workload and a deployment by path relative to the fleet file's folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.yaml").write_text(yaml.safe_dump(dict(
        id="w", description="d", input_len=10, output_len=5, ttft_ms=100, tpot_ms=10, count="output")))
    dep = (config_dir("deployments") / "qwen3-moe-dp-ep8.yaml").read_text()
    (tmp_path / "sub" / "qwen3-moe-dp-ep8.yaml").write_text(dep)
    p = fleet_file(workloads=[{"workload": "sub/w.yaml", "share": 1.0}],
                   deployments=[{"model": "llama-3.1-8b", "deployment": "sub/qwen3-moe-dp-ep8.yaml", "source": "s"}])
    f, path = F.fleet_of(p)
    assert path == p and f.workloads[0].workload == str(tmp_path / "sub" / "w.yaml")
    assert f.deployments[0].deployment == str(tmp_path / "sub" / "qwen3-moe-dp-ep8.yaml")
    assert F._count_of(f.workloads[0].workload) == "output"
    # a tp every model splits over is fine
    F.fleet_of(fleet_file(gpus=[{"gpu": "h100-sxm", "count": 8, "tp": 2, "source": "t"}]))


def test_by_path(tmp_path, monkeypatch):
    fleet = tmp_path / "fleets" / "f.yaml"
    fleet.parent.mkdir()
    (fleet.parent / "w.yaml").write_text("x")
    (fleet.parent / "w.yml").write_text("x")
    (fleet.parent / "w.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.yaml").write_text("x")
    assert F.by_path("w.yaml", fleet) == str(fleet.parent / "w.yaml")
    assert F.by_path("w.yml", str(fleet)) == str(fleet.parent / "w.yml")
    assert F.by_path("w.txt", fleet) == "w.txt"  # not a yaml file: a name
    assert F.by_path("chat", fleet) == "chat"
    assert F.by_path("here.yaml", fleet) == "here.yaml"  # found as given
    (tmp_path / "w.yaml").write_text("x")
    assert F.by_path("w.yaml", fleet) == "w.yaml"  # found as given wins over the fleet file's folder
    assert F.by_path("w.yaml", None) == "w.yaml"  # no fleet file
    assert F.by_path("gone.yaml", fleet) == "gone.yaml"  # nowhere: left for the error that names it
    assert F.by_path(str(tmp_path / "x" / "w.yaml"), fleet) == str(tmp_path / "x" / "w.yaml")  # absolute


def test_fleet_of_and_small_helpers():
    f = two_types()
    assert F.fleet_of(f) == (f, None)
    named, path = F.fleet_of("h100-node")
    assert named.id == "h100-node" and path.endswith("h100-node.yaml")
    dep = two_types(deployments=[
        {"model": "llama-3.1-8b", "deployment": "first", "gpus": ["h20"], "source": "s"},
        {"model": "llama-3.1-8b", "deployment": "second", "source": "s"},
        {"model": "llama-3.1-8b", "deployment": "third", "source": "s"}])
    assert F.deployment_for(dep, "llama-3.1-8b", "h20") == "first"
    assert F.deployment_for(dep, "llama-3.1-8b", "h100-sxm") == "second"
    assert F.deployment_for(dep, "qwen3-8b", "h20") is None and F.deployment_for(f, "llama-3.1-8b", "h20") is None
    chat = F.workload_of("chat")
    assert (chat.ttft_ms, chat.tpot_ms) == (1000, 50)
    off = F.workload_of("chat", offline=True)
    assert (off.ttft_ms, off.tpot_ms, off.input_len) == (1e9, 1e9, chat.input_len) and F.NO_LIMIT_MS == 1e9
    mix = two_types(models=[{"model": "a", "share": 0.75}, {"model": "b", "share": 0.25}])
    assert F.classes_of(mix) == [("a", "chat", 0.375), ("a", "reasoning", 0.375), ("b", "chat", 0.125),
                                 ("b", "reasoning", 0.125)]
    assert F.classes_of(mix, [("summarize-8k", 1.0)]) == [("a", "summarize-8k", 0.75), ("b", "summarize-8k", 0.25)]
    assert F.deployment_of(f) == {"kv_dtype": "fp8", "batch_cap": 64, "max_batched_tokens": 4096}
    assert F.DAYS_PER_MONTH == 365.25 / 12 and (F.REPORTED, F.PRIMARY) == ("china-reported", "china-nda")


def test_sweep_by_hand(fake):
    rows = F.sweep(two_types(), SCENARIO)
    got = [(r["variable"], r["value"], r["capacity_tokens_per_day"] / DAY) for r in rows]
    want = [("baseline", "fleet file", LAM * 0.5)]
    want += [("utilization", u, LAM * u) for u in (0.3, 0.5, 0.7, 0.9, 1.0)]
    want += [("workload", "chat", 60 * 0.5), ("workload", "reasoning", 50 * 0.5)]  # one class: supplies add
    want += [("dtype", "bf16", LAM * 0.5), ("dtype", "fp8", 2 * LAM * 0.5)]
    assert [(v, x) for v, x, _ in got] == [(v, x) for v, x, _ in want]
    for (_, _, a), (_, _, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-9)
    for r in rows:
        cap = r["capacity_tokens_per_day"]
        assert r["coverage"] == pytest.approx(cap / 4e6, rel=1e-12)
        assert r["coverage_vs_china_reported"] == pytest.approx(cap / 8e7, rel=1e-12)
        assert r["coverage_vs_china_nda"] == pytest.approx(cap / 2e8, rel=1e-12)
        assert r["outgrows_fleet_on"] == JAN1 + dt.timedelta(round(30 * math.log2(cap / 2e6)))
        assert set(r) == {"variable", "value", "capacity_tokens_per_day", "coverage", "coverage_vs_china_reported",
                          "coverage_vs_china_nda", "outgrows_fleet_on"}
    assert [c["dtype"] for c in fake.calls][-4:] == ["fp8"] * 4
    one = F.sweep(two_types(), SCENARIO, peak_factor=1.0, demand_tokens_per_day=1e6)
    assert one[0]["coverage"] == pytest.approx(LAM * DAY * 0.5 / 1e6, rel=1e-9)


def test_a_type_without_power_or_any_class_it_can_hold(fake, monkeypatch):
    monkeypatch.setitem(EXTRA, ("h100-sxm", "reasoning"), dict(source="measured"))  # no power stated anywhere on h100
    one = two_types(gpus=[{"gpu": "h100-sxm", "count": 10, "tp": 2, "source": "s"}])
    rows, s = F.capacity_table(one, SCENARIO)
    h100, total = rows
    assert (h100["power_mw"], h100["energy_mwh_per_day"], h100["joules_per_token"]) == (None, None, None)
    assert (total["power_mw"], total["energy_mwh_per_day"], total["joules_per_token"]) == (None, None, None)
    assert total["source"] == h100["source"] == "measured"  # one type: its source, not "mixed"
    assert h100["e_c"] is None and h100["efficiency_source"] == "measured"
    real = FakeProjection.result
    monkeypatch.setattr(FakeProjection, "result", lambda self, *a: {**real(self, *a), "fits": False})
    rows, s = F.capacity_table(one, SCENARIO)
    h100, total = rows
    assert (h100["gpus_needed_alone"], h100["tokens_per_day"], h100["tokens_per_s_per_gpu"]) == (None, 0.0, 0.0)
    assert h100["unservable"] == "llama-3.1-8b/chat, llama-3.1-8b/reasoning" == total["unservable"]
    assert (total["tokens_per_day"], total["joules_per_token"], s["capacity_tokens_per_day"]) == (0.0, None, 0.0)
    assert (s["outgrows_fleet_on"], s["capacity_low_tokens_per_day"], s["capacity_high_tokens_per_day"]) == \
        (None, 0.0, 0.0)


def test_one_dated_figure_has_no_growth(fake):
    _, s = F.capacity_table(two_types(), demand("one", (JAN1, 1e6)))
    assert (s["growth_per_month"], s["doubling_months"], s["growth_fit"], s["outgrows_fleet_on"]) == \
        (None, None, "one point: no growth fit", None)
    cover = LAM * DAY * 0.5 / 2e6  # above 1: not outgrown, and no fit to say when
    assert cover > 1 and s["demand_outgrows_fleet"] == "not at the fitted growth (no fit, or demand not growing)"


def test_workloads_given_replace_the_fleets(fake):
    _, s = F.capacity_table(two_types(), SCENARIO, workloads=[("chat", 1.0)])
    assert s["counted_tokens"] == "chat: total"
    assert s["capacity_tokens_per_day"] == pytest.approx(60 * DAY * 0.5, rel=1e-9)  # chat alone: 40 + 20


def test_runs_are_read_once_and_reach_every_projection(fake, monkeypatch):
    read = []
    monkeypatch.setattr(F, "read_runs", lambda runs: read.append(runs) or ["run-a"] if runs else [])
    monkeypatch.setattr(F, "efficiency_from_runs", lambda runs: type("E", (), {"to_dict": lambda self: runs})())
    _, s = F.capacity_table(two_types(), SCENARIO, runs=["folder"])
    assert read == [["folder"]] and s["efficiency"] == ["run-a"]
    assert {tuple(c["runs"]) for c in fake.calls} == {("run-a",)}
    fake.calls.clear()
    read.clear()
    F.sweep(two_types(), SCENARIO, runs=["folder"])
    assert read[0] == ["folder"] and read[1:] == [["run-a"]] * 10  # the folders once; each case gets the runs read
    assert {tuple(c["runs"]) for c in fake.calls} == {("run-a",)}


def test_defaults_of_a_bare_fleet(fake):
    """No planning knobs in the file: utilization 1, peak factor 1, PUE 1 (config.Fleet), the reported China figure
    as demand, the engine's deployment defaults (None), each model's own dtype (None: its native one), online."""
    bare = Fleet.model_validate(dict(id="bare", description="d", gpus=[{"gpu": "h100-sxm", "count": 3, "source": "s"}],
                                     models=[{"model": "llama-3.1-8b", "share": 1.0}],
                                     workloads=[{"workload": "chat", "share": 1.0}]))
    rows, s = F.capacity_table(bare)
    assert (s["demand"], s["utilization"], s["peak_factor"], s["pue"], s["offline"]) == \
        ("china-reported", 1.0, 1.0, 1.0, False)
    assert s["capacity_tokens_per_day"] == pytest.approx(3 * 4.0 * DAY, rel=1e-12)
    assert s["coverage"] == pytest.approx(3 * 4.0 * DAY / 4e7, rel=1e-12)
    (c,) = fake.calls
    assert (c["how"], c["dtype"], c["kv_dtype"], c["batch_cap"], c["max_batched_tokens"]) == \
        ("auto_tp", None, None, None, None)
    assert (c["workload"].ttft_ms, c["workload"].tpot_ms) == (1000, 50)
    assert rows[0]["power_mw"] is None and rows[0]["count_source"] == "s"


def test_gpu_mix_is_online_unless_asked(fake):
    F.gpu_mix("h20", two_types(), None, [])
    assert [(c["workload"].id, c["workload"].ttft_ms, c["workload"].tpot_ms) for c in fake.calls] == \
        [("chat", 1000, 50), ("reasoning", 2000, 30)]
