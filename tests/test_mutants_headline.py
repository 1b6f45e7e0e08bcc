"""Oracles for tokenfleet.capacity.headline (`make mutate`): a fleet's headline from rows and a summary written by
hand (two GPU types and the total row), every figure worked out here: coverage, GPUs needed alone and as the mix
scaled (ceil per type), outgrow states, sources, the device note, the printed lines, the number formats."""

import datetime as dt
from types import SimpleNamespace

import pytest
from tokenfleet.capacity import headline as Hd

TODAY = dt.date(2030, 6, 1)  # not the real date: a headline that ignored `today` would differ


def _rows():
    return [
        {"gpu": "h100-sxm", "count": 1001, "source": "measured", "alone_tokens_per_s_per_gpu": 2000.0,
         "tokens_per_day_per_gpu": 1.0, "efficiency_source": "measured", "e_c": 0.5, "e_m": 0.7,
         "count_source": "published estimate"},
        {"gpu": "h20", "count": 2999, "source": "projected", "tokens_per_day_per_gpu": 5e7,
         "efficiency_source": "global default", "e_c": 0.5, "e_m": 0.7, "count_source": "assumption: placeholder"},
        {"gpu": "total", "count": 4000, "source": "measured", "count_source": "assumption"},
    ]


def _summary(**kw):
    s = {"fleet": "test-mix", "capacity_tokens_per_day": 2e12, "peak_factor": 2.0, "utilization": 0.5,
         "china_reported_tokens_per_day": 4e11, "china_nda_tokens_per_day": 1.5e12,
         "outgrows_fleet_on_china_reported": "2031-01-15", "outgrows_fleet_on_china_nda": None,
         "efficiency": {"compute": 0.5, "memory": 0.7, "from": "defaults", "overhead_ms": 0.3}}
    return {**s, **kw}


def test_demands_by_hand():
    h = Hd.headline(_rows(), _summary(), today=TODAY)
    rep, pri = h["demands"]
    # reported: 4e11 x peak 2 = 8e11 against 2e12: coverage 2.5, scale 0.4: ceil(400.4) + ceil(1199.6) = 401 + 1200
    # alone: h100 2000 tok/s x 86,400 x 0.5 = 8.64e7/day -> ceil(9259.26) = 9260; h20 5e7/day (its routed figure)
    assert rep == {"demand": "china-reported", "label": "reported", "tokens_per_day": 4e11,
                   "peak_tokens_per_day": 8e11, "coverage": 2.5, "capacity_over_demand": 5.0, "mix_scale": 0.4,
                   "gpus_needed_mix": 1601, "gpus_needed_mix_by_type": {"h100-sxm": 401, "h20": 1200},
                   "gpus_needed_alone": {"h100-sxm": 9260, "h20": 16000},
                   "outgrows_fleet_on": dt.date(2031, 1, 15), "outgrown": "later",
                   "demand_outgrows_fleet": "on 2031-01-15, at the fitted growth"}
    # primary: 1.5e12 x 2 = 3e12: coverage 2/3, scale 1.5: ceil(1501.5) + ceil(4498.5) = 1502 + 4499
    assert pri == {"demand": "china-nda", "label": "primary", "tokens_per_day": 1.5e12,
                   "peak_tokens_per_day": 3e12, "coverage": 2e12 / 3e12, "capacity_over_demand": 2e12 / 1.5e12,
                   "mix_scale": 1.5, "gpus_needed_mix": 6001,
                   "gpus_needed_mix_by_type": {"h100-sxm": 1502, "h20": 4499},
                   "gpus_needed_alone": {"h100-sxm": 34723, "h20": 60000},
                   "outgrows_fleet_on": None, "outgrown": "already",
                   "demand_outgrows_fleet": "already: the latest dated demand × peak factor is above the fleet"}


def test_demand_with_a_date_object_and_by_today():
    s = _summary(outgrows_fleet_on_china_reported=dt.date(2030, 6, 1), china_nda_tokens_per_day=1e11)
    rep, pri = Hd.headline(_rows(), s, today=TODAY)["demands"]
    assert (rep["outgrows_fleet_on"], rep["outgrown"]) == (dt.date(2030, 6, 1), "by today")
    assert rep["demand_outgrows_fleet"] == \
        "by today: at the fitted growth, demand × peak factor passed the fleet on 2030-06-01"
    assert (pri["coverage"], pri["outgrown"]) == (10.0, "never")


def test_demand_without_capacity_or_rates():
    rows = _rows()
    rows[0]["alone_tokens_per_s_per_gpu"] = 0.0
    del rows[1]["tokens_per_day_per_gpu"]
    rep = Hd.headline(rows, _summary(capacity_tokens_per_day=0.0), today=TODAY)["demands"][0]
    assert (rep["coverage"], rep["mix_scale"], rep["gpus_needed_mix"], rep["gpus_needed_mix_by_type"]) == \
        (0.0, None, None, {})
    assert rep["gpus_needed_alone"] == {"h100-sxm": None, "h20": None}


def test_alone_per_day():
    assert Hd._alone_per_day({"alone_tokens_per_s_per_gpu": 10.0, "tokens_per_day_per_gpu": 3.0},
                             {"utilization": 0.25}) == 10.0 * 86400 * 0.25
    assert Hd._alone_per_day({"alone_tokens_per_s_per_gpu": None, "tokens_per_day_per_gpu": 3.0}, {}) == 3.0
    assert Hd._alone_per_day({}, {}) is None


def test_headline_fields():
    s = _summary(capacity_low_tokens_per_day=1e12, capacity_high_tokens_per_day=3e12, gpus_low=3000,
                 gpus_high=5000, counts_with_range=["h100-sxm"])
    rows = _rows() + [{"gpu": "l20", "count": 0, "source": "family"}, {"gpu": "x", "count": 0, "source": None}]
    h = Hd.headline(rows, s, today=TODAY)
    assert (h["fleet"], h["gpus"], h["capacity_tokens_per_day"]) == ("test-mix", 4000, 2e12)
    assert (h["capacity_low_tokens_per_day"], h["capacity_high_tokens_per_day"], h["gpus_low"], h["gpus_high"]) == \
        (1e12, 3e12, 3000, 5000)
    assert (h["counts_with_range"], h["counts_placeholder"]) == (["h100-sxm"], ["h20"])
    assert (h["utilization"], h["peak_factor"]) == (0.5, 2.0)
    assert h["efficiency"] == {"compute": 0.5, "memory": 0.7, "from": "defaults"}
    assert h["efficiencies"] == {"h100-sxm": {"kind": "measured", "compute": 0.5, "memory": 0.7},
                                 "h20": {"kind": "global default", "compute": 0.5, "memory": 0.7},
                                 "l20": {"kind": None, "compute": None, "memory": None},
                                 "x": {"kind": None, "compute": None, "memory": None}}
    assert h["sources"] == {"measured": ["h100-sxm"], "calibrated": [], "projected": ["h20"], "family": ["l20"]}
    assert list(h["sources"]) == ["measured", "calibrated", "projected", "family"]
    assert h["measured_on"] == {"runs": [], "note": "no run given: GPU figures are projected with default efficiencies"}


def test_headline_without_optional_summary_fields():
    s = _summary()
    del s["efficiency"]
    h = Hd.headline(_rows(), s, today=TODAY)
    assert (h["capacity_low_tokens_per_day"], h["gpus_low"], h["gpus_high"], h["counts_with_range"]) == \
        (None, None, None, [])
    assert h["efficiency"] == {"compute": None, "memory": None, "from": None}
    assert h["measured_on"]["note"] == "no run given: GPU figures are projected with default efficiencies"


def _run(run_id, device, kind, hw):
    return SimpleNamespace(run_id=run_id, device=device, hardware_id=hw,
                           manifest={"environment": {"device": {"kind": kind}}} if kind else {})


def test_measured_on():
    cpu = _run("r1", "cpu0", "cpu", "cpu")
    gpu = _run("r2", "NVIDIA H200", "cuda", "h200")
    unknown = _run("r3", "mystery", "cuda", None)
    no_env = _run("r4", "old", None, "h100-sxm")
    assert Hd._measured_on([cpu, unknown], {"from": "x"}) == {
        "runs": [{"run": "r1", "device": "cpu0", "kind": "cpu", "datasheet": "cpu"},
                 {"run": "r3", "device": "mystery", "kind": "cuda", "datasheet": None}],
        "note": "a CPU run gives no GPU efficiencies: GPU figures are projected with default efficiencies"}
    assert Hd._measured_on([cpu, gpu], {"from": "run r2"})["note"] == "GPU efficiencies from run r2"
    assert Hd._measured_on([no_env], {})["runs"] == [{"run": "r4", "device": "old", "kind": None,
                                                      "datasheet": "h100-sxm"}]
    assert Hd._measured_on([no_env], {})["note"] == "GPU efficiencies from None"
    empty = SimpleNamespace(run_id="r5", device="d", hardware_id="h200", manifest={"environment": None})
    assert Hd._measured_on([empty], {})["runs"][0]["kind"] is None
    assert Hd._measured_on(None, {})["note"].startswith("no run given")


@pytest.mark.parametrize("x, text", [(3.91e13, "39.1T"), (1e11, "0.1T"), (99_999_999_999, "100B"), (1e8, "0.1B"),
                                     (99_999_999, "99,999,999"), (1.4e13, "14T"), (0, "0")])
def test_tokens(x, text):
    assert Hd.tokens(x) == text


def test_scale_and_count():
    assert [Hd._scale(x) for x in (100, 99.56, 1234.6, 0.4)] == ["100", "99.6", "1,235", "0.4"]
    assert [Hd._count(n) for n in (None, 0, 12345)] == ["n/a", "0", "12,345"]


def test_headline_lines_by_hand():
    h = Hd.headline(_rows(), _summary(), today=TODAY)
    assert Hd.headline_lines(h) == [
        "test-mix: 4,000 GPUs serve 2T tokens/day (T = 10^12 = 万亿; utilization 0.5, peak factor 2)",
        "  measured on: no run",
        "    no run given: GPU figures are projected with default efficiencies",
        "  placeholder counts (no published estimate): h20",
        "  demand × peak        coverage    GPUs needed, this mix scaled  outgrows the fleet",
        "  reported 0.4T/day         2.5                    1,601 (×0.4)  on 2031-01-15",
        "  primary 1.5T/day        0.667                    6,001 (×1.5)  already (fitted crossing n/a)",
        "  one type alone for 0.4T / 1.5T: h100-sxm 9,260 / 34,723; h20 16,000 / 60,000",
        "  GPUs needed do not depend on the fleet's counts (one type alone: its rate per GPU only; the mix scaled: "
        "only their proportions)",
        "  figures: measured: h100-sxm; calibrated: none; projected: h20 (e_c/e_m measured h100-sxm 0.50/0.70; "
        "global default 0.50/0.70)"]


def test_headline_lines_other_states():
    s = _summary(outgrows_fleet_on_china_reported=None, china_reported_tokens_per_day=1e11,
                 outgrows_fleet_on_china_nda="2030-01-01", capacity_tokens_per_day=0.0)
    h = Hd.headline(_rows(), s, today=TODAY)
    lines = Hd.headline_lines(h)
    assert lines[5] == "  reported 0.1T/day           0                             n/a  already (fitted crossing n/a)"
    assert lines[6] == ("  primary 1.5T/day            0                             n/a  already (fitted crossing "
                        "2030-01-01)")
    s = _summary(outgrows_fleet_on_china_reported=None, outgrows_fleet_on_china_nda="2030-01-01",
                 china_nda_tokens_per_day=1e11)
    lines = Hd.headline_lines(Hd.headline(_rows(), s, today=TODAY))
    assert lines[5].endswith("  not at the fitted growth")
    assert lines[6].endswith("  by today (fitted crossing 2030-01-01)")


def test_headline_lines_without_per_type_efficiencies():
    h = Hd.headline(_rows(), _summary(), today=TODAY)
    del h["efficiencies"]
    assert Hd.headline_lines(h)[-1] == ("  figures: measured: h100-sxm; calibrated: none; projected: h20 "
                                        "(e_c 0.50, e_m 0.70)")
    h["efficiencies"] = {}
    assert Hd.headline_lines(h)[-1].endswith("(e_c 0.50, e_m 0.70)")


def test_headline_lines_with_runs_ranges_and_placeholders():
    s = _summary(capacity_low_tokens_per_day=1e12, capacity_high_tokens_per_day=3e12, gpus_low=3000,
                 gpus_high=5000, counts_with_range=["h100-sxm", "h20"])
    h = Hd.headline(_rows(), s, runs=[_run("r2", "NVIDIA H200", "cuda", "h200")], today=TODAY)
    lines = Hd.headline_lines(h)
    assert lines[1:5] == [
        "  measured on: NVIDIA H200 (cuda, run r2)",
        "    GPU efficiencies from defaults",
        "  counts low / central / high: 3,000 / 4,000 / 5,000 GPUs serve 1T / 2T / 3T tokens/day (published ranges: "
        "h100-sxm, h20)",
        "  placeholder counts (no published estimate): h20"]


def test_count_lines():
    assert Hd._count_lines({}) == []
    assert Hd._count_lines({"counts_placeholder": ["a", "b"]}) == ["  placeholder counts (no published estimate): a, b"]


def test_device_lines_wrap_at_110():
    runs = [{"device": f"device-{i:02d}", "kind": "cuda", "run": f"run-{i:02d}"} for i in range(5)]
    lines = Hd._device_lines({"runs": runs, "note": "n " * 60})
    first = "  measured on: " + ", ".join(f"device-{i:02d} (cuda, run run-{i:02d})" for i in range(5))
    assert len(first) > 110
    assert lines[0] == first[:first.rindex(" ", 0, 111)] and len(lines[0]) <= 110
    assert lines[1].startswith("    device-") and lines[-1].startswith("    n")
    assert all(len(x) <= 110 for x in lines)
    assert lines[2:] == ["    " + "n " * 52 + "n", "    " + ("n " * 7).strip()]


def test_wrap():
    assert Hd._wrap("  head:", ["a", "b"]) == ["  head: a; b"]
    assert Hd._wrap("  head:", ["aaaa", "bbbb", "cccc"], width=15) == ["  head: aaaa;", "    bbbb; cccc"]
    # exactly at the width: 7 + 4 + 2 = 13 fits a width of 13, not 12
    assert Hd._wrap("  head:", ["aaaa"], width=13) == ["  head: aaaa"]
    assert Hd._wrap("  head:", ["aaaa"], width=12) == ["  head:;", "    aaaa"]
    assert Hd._wrap("", ["a", "b"]) == ["a; b"]
    assert Hd._wrap("   ", ["aaaa"], width=5) == ["   aaaa"]  # a blank first line is never emitted alone
    assert Hd._wrap("  x:", []) == ["  x:"]


def test_efficiency_items():
    assert Hd._efficiency_items({"a": {"kind": "global default", "compute": 0.5, "memory": 0.7},
                                 "b": {"kind": "global default", "compute": 0.5, "memory": 0.7}}) == \
        ["global default 0.50/0.70"]
    assert Hd._efficiency_items({"a": {"kind": "global default", "compute": 0.5, "memory": 0.7},
                                 "b": {"kind": "global default", "compute": 0.4, "memory": 0.7}}) == \
        ["global default a 0.50/0.70, b 0.40/0.70"]
    assert Hd._efficiency_items({"a": {"kind": "family default", "compute": 0.55, "memory": 0.65},
                                 "b": {"kind": "family default", "compute": 0.55, "memory": 0.65},
                                 "c": {"kind": None, "compute": None, "memory": None},
                                 "d": {"kind": "global default", "compute": None, "memory": None}}) == \
        ["family default a 0.55/0.65, b 0.55/0.65", "none c", "global default d"]


def test_wrap_default_width_is_110():
    a, b = "a" * 52, "b" * 52  # "  x: " + 52 + "; " + 52 = 111 characters
    assert Hd._wrap("  x:", [a, b]) == ["  x: " + a + ";", "    " + b]
    assert Hd._wrap("  x:", [a, b[:-1]]) == ["  x: " + a + "; " + b[:-1]]  # 110: fits


def test_demands_must_name_the_same_types():
    h = Hd.headline(_rows(), _summary(), today=TODAY)
    del h["demands"][1]["gpus_needed_alone"]["h20"]
    with pytest.raises(ValueError):
        Hd.headline_lines(h)


def test_figures_line_lists_each_sources_types():
    h = Hd.headline(_rows(), _summary(), today=TODAY)
    h["sources"] = {"measured": ["h100-sxm", "h20"], "calibrated": [], "projected": []}
    assert Hd.headline_lines(h)[-1].startswith(
        "  figures: measured: h100-sxm, h20; calibrated: none; projected: none (e_c/e_m ")


def test_tokens_divide_by_exact_powers_of_ten():
    # 1.375 is a tie at 3 digits (rounded to even: 1.38); any other divisor moves it off the tie
    assert (Hd.tokens(1.375e12), Hd.tokens(1.375e9)) == ("1.38T", "1.38B")


def test_device_line_wraps_at_110():
    line = "  measured on: " + "d" * 85 + " (k, run r)"  # 111 characters: one too many
    assert len(line) == 111
    assert Hd._device_lines({"runs": [{"device": "d" * 85, "kind": "k", "run": "r"}], "note": "n"}) == \
        ["  measured on: " + "d" * 85 + " (k, run", "    r)", "    n"]
    assert Hd._device_lines({"runs": [{"device": "d" * 84, "kind": "k", "run": "r"}], "note": "n"})[0] == \
        "  measured on: " + "d" * 84 + " (k, run r)"
