"""What runs tell the capacity model: measured grids (this device, model, dtype, backend, tp), measured collective
curves (this device, world size), and efficiencies (e_c, e_m) to calibrate devices no run measured.

- A point belongs to a group (datasheet id, model, dtype, tp, shard). A `tp: p` point with `world_size` p is a
  tensor-parallel replica measured on p ranks, collectives included (the tp part). A `tp: p > 1` point without it
  is the model part's *shard*: one GPU's slice timed on one GPU, no collectives. A shard is never a measurement of
  a tp=p replica: it is used only where no replica was measured, as per-GPU compute to which the collectives are
  added (`Measured.shard`; rows say `measured-shard`). Within a group the *deployable* backend is the
  fastest correct one of `triton` and `compile` (`torch` only when it is the only backend there): a backend with
  any `incorrect` point is not correct. Only the deployable backend's points enter numbers.
- All given runs are merged: each cell (decode: batch × context; prefill: batch × prompt_len) takes the point
  with the smallest spread, whichever run it came from.
- MoE points count only under their default routing (`_default_routing`: the model's own routers; skewed-routing
  points are left out of grids and efficiencies); one GPU's EP slice (`ep`) is not the model's grid either: the EP
  pools read its routed-expert time (`expert.measured_experts`).
- Collectives: a run of this device with `all_reduce` points at world size tp gives the curve TP projections use
  (`measured_allreduce`); nccl points before gloo ones.
- Efficiencies for other devices (from tp=1 and shard groups; replica groups only when nothing else was run,
  their times including communication): e_m = median `mbu_datasheet` of the deployable decode points, e_c = median
  `mfu_datasheet` of the deployable prefill points, from points of the projected dtype when a run has them (fp8
  from fp8), else of any dtype (said in `source`). The step overhead is folded into e_m (MBU is measured over the
  whole step), so calibrated projections add none.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.interpolate import RegularGridInterpolator
from scipy.spatial.distance import cdist
from tokenfleet.results import Run, load_run, usable

if TYPE_CHECKING:  # the measure part's curve type; importing it loads every part (and torch)
    from tokenfleet.measure.parts.collective import CollectiveCurve

# Documented defaults when no run is given. Assumptions, not measurements of this project: replace them with a run.
#  e_c 0.5: fraction of the DENSE datasheet matmul peak a whole forward sustains (large GEMMs alone reach more on
#           Hopper; attention, norms, MoE grouping and launch gaps pull a full pass down).
#  e_m 0.7: fraction of datasheet HBM bandwidth a decode step streams weights + KV at (a device copy runs near
#           0.8-0.9 of datasheet; decode GEMVs and paged attention do worse).
#  overhead 0.3 ms per forward: scheduler, sampling and launch gaps with CUDA graphs.
DEFAULT_E_C, DEFAULT_E_M, DEFAULT_OVERHEAD_MS = 0.5, 0.7, 0.3
DEPLOYABLE = ("triton", "compile")


@dataclass(frozen=True)
class Efficiency:
    compute: float = DEFAULT_E_C
    memory: float = DEFAULT_E_M
    overhead_ms: float = DEFAULT_OVERHEAD_MS
    source: str = "defaults (e_c 0.5, e_m 0.7, 0.3 ms/forward: assumptions, see harness/capacity/calibrate.py)"
    run_id: str | None = None  # the run the efficiencies come from (None: defaults)
    # calibrated (a run's), family default (capacity.families: published per-family measurements) or global default
    kind: str = "global default"

    def to_dict(self) -> dict:
        return {"compute": self.compute, "memory": self.memory, "overhead_ms": self.overhead_ms, "from": self.source,
                "kind": self.kind}


def read_runs(paths: list[str | Path | Run] | None) -> list[Run]:
    """Run folders (paths or run ids under results/runs/) read once; ConfigError when unreadable."""
    return [load_run(p) for p in paths or []]


def _pos(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


def _spread(p: dict) -> float:
    s = p.get("spread")
    return float(s) if isinstance(s, (int, float)) and math.isfinite(s) else math.inf


def _seconds(p: dict) -> float | None:
    for k in ("tpot_ms", "median_ms") if p.get("kind") == "decode" else ("median_ms", "ttft_ms"):
        if _pos(p.get(k)):
            return float(p[k]) / 1e3
    return None


def _cell(p: dict) -> tuple | None:
    if p.get("kind") == "decode" and _pos(p.get("batch")) and _pos(p.get("context")):
        return ("decode", p["batch"], p["context"])
    if p.get("kind") == "prefill" and _pos(p.get("batch")) and _pos(p.get("prompt_len")):
        return ("prefill", p["batch"], p["prompt_len"])
    return None


def _tp(p: dict) -> tuple[int, bool]:
    """(tp, shard): shard when tp > 1 but the point was not measured on tp ranks (no `world_size` == tp)."""
    tp = int(p.get("tp") or 1)
    return tp, tp > 1 and p.get("world_size") != tp


@dataclass
class Group:
    """The model points of one (datasheet id, model, dtype, tp, shard), all runs merged, per backend."""

    hardware_id: str
    model: str
    dtype: str
    tp: int
    shard: bool
    points: dict  # backend -> list[(run_id, point)]

    @property
    def replica(self) -> bool:
        """Measured on tp ranks with its collectives (a tp > 1 replica, not a shard)."""
        return self.tp > 1 and not self.shard

    def correct(self) -> list[str]:
        return [b for b, pts in self.points.items()
                if not any(p.get("status") == "incorrect" for _, p in pts) and any(usable(p) for _, p in pts)]

    def deployable(self) -> str | None:
        """The fastest correct backend of `triton`/`compile` (geometric mean time over the cells both measured; the
        first, triton, when they share none), else `torch` when it is the only backend present, else None."""
        ok = self.correct()
        cands = [b for b in DEPLOYABLE if b in ok]
        if not cands:
            return "torch" if ok == ["torch"] and set(self.points) == {"torch"} else None
        cells = {b: self.cells(b) for b in cands}
        shared = set.intersection(*(set(c) for c in cells.values()))
        return min(cands, key=lambda b: sum(math.log(cells[b][k][0]) for k in shared))  # min: the first of equals

    def cells(self, backend: str) -> dict:
        """cell -> (seconds, spread, run_id, point): the smallest-spread usable point of each cell."""
        best: dict = {}
        for run_id, p in self.points.get(backend, []):
            key, t = _cell(p), _seconds(p)
            if not usable(p) or key is None or t is None:
                continue
            if key not in best or _spread(p) < best[key][1]:
                best[key] = (t, _spread(p), run_id, p)
        return best


def _default_routing(p: dict) -> bool:
    """An MoE point routed by the model's own routers (`routing` router; dense points have none): the condition the
    capacity model's expected experts touched assumes (uniform). A skewed-routing point (zipf-s) is a what-if beside
    it, not the measurement of the grid."""
    return p.get("routing", "router") == "router"


def groups(runs: list[Run]) -> dict[tuple, Group]:
    """(hardware_id, model, dtype, tp, shard) -> Group over every run given."""
    out: dict[tuple, Group] = {}
    for r in runs:
        hw = r.hardware_id
        for p in r.points:
            if p.get("kind") not in ("decode", "prefill") or not hw or not p.get("model") or not _default_routing(p):
                continue
            if p.get("ep", 1) > 1:  # one GPU's EP slice: an expert time for the EP pools (expert.measured_experts)
                continue
            key = (hw, p["model"], p.get("dtype"), *_tp(p))
            g = out.setdefault(key, Group(*key, points=defaultdict(list)))
            g.points[p.get("backend") or "unknown"].append((r.run_id, p))
    return out


# ---- measured grids ------------------------------------------------------------------------------------------
def _log2s(a: float, b: float) -> tuple[float, float]:
    return math.log2(max(a, 1e-9)), math.log2(max(b, 1e-9))


class RatioGrid:
    """measured/projected over (a, b) cells on log2 axes: bilinear inside the grid (scipy's RegularGridInterpolator),
    held at its edges beyond them (coordinates clipped to the grid); a missing grid cell takes its nearest sample
    (the mean of the nearest when several are as near)."""

    def __init__(self, samples: list[tuple[float, float, float]]):
        pts = np.log2([(a, b) for a, b, _ in samples])
        self.xs, self.ys = np.unique(pts[:, 0]), np.unique(pts[:, 1])
        ratios = np.array([r for _, _, r in samples])
        cells = [(x, y) for x in self.xs for y in self.ys]
        d = cdist(cells, pts)  # euclidean
        nearest = d == d.min(axis=1, keepdims=True)
        self.grid = ((nearest @ ratios) / nearest.sum(axis=1)).reshape(len(self.xs), len(self.ys))
        self._f = RegularGridInterpolator((self.xs, self.ys), self.grid)  # method "linear", the default

    def __call__(self, a: float, b: float) -> float:
        la, lb = _log2s(a, b)
        return float(self._f((np.clip(la, self.xs[0], self.xs[-1]), np.clip(lb, self.ys[0], self.ys[-1]))))

    def inside(self, a: float, b: float) -> bool:
        la, lb = _log2s(a, b)
        eps = 1e-9
        return self.xs[0] - eps <= la <= self.xs[-1] + eps and self.ys[0] - eps <= lb <= self.ys[-1] + eps


@dataclass
class Measured:
    """The measured cells of one group on its deployable backend, as seconds per decode step / prefill."""

    backend: str
    runs: list[str]
    decode: dict  # (batch, context) -> seconds
    prefill: dict  # (batch, prompt_len) -> seconds
    power_w: float | None = None
    shard: bool = False  # one GPU's shard timed alone: per-GPU compute, collectives not included
    # decode batch -> mean board power over the samples (NVML's energy counter: the points' power_w_measured),
    # the median over contexts; empty when the runs predate the counter
    energy_w: dict = field(default_factory=dict)

    def power_at(self, batch: float) -> tuple[float | None, str | None]:
        """The board power serving at `batch`, and where it comes from: the energy counter's at the nearest measured
        decode batch (log distance), else the NVML reading after the decode points, else (None, None)."""
        if self.energy_w:
            b = min(self.energy_w, key=lambda x: abs(math.log(x / max(batch, 1))))
            return self.energy_w[b], f"measured: NVML energy counter, decode batch {b} (run {', '.join(self.runs)})"
        if self.power_w:
            return self.power_w, f"measured: NVML power read after the decode points (run {', '.join(self.runs)})"
        return None, None

    @property
    def label(self) -> str:
        what = "shard on one GPU, collectives added: " if self.shard else ""
        return f"{what}{self.backend}, run {', '.join(self.runs)}"


def measured_for(runs: list[Run], hardware_id: str, model: str, dtype: str, tp: int) -> Measured | None:
    """This device, model, dtype and tp on the deployable backend: the tp replica when a run measured it on tp
    ranks, else (tp > 1) the model part's shard points as per-GPU compute (`shard`); None when neither."""
    gs = groups(runs)
    return _measured(gs.get((hardware_id, model, dtype, tp, False))) or \
        _measured(gs.get((hardware_id, model, dtype, tp, True)))  # shard groups exist only for tp > 1 (`_tp`)


def _measured(g: Group | None) -> Measured | None:
    backend = g.deployable() if g else None
    if backend is None:
        return None
    cells = g.cells(backend)
    if not cells:
        return None
    dec = {(k[1], k[2]): v[0] for k, v in cells.items() if k[0] == "decode"}
    pre = {(k[1], k[2]): v[0] for k, v in cells.items() if k[0] == "prefill"}
    power = [v[3]["telemetry"]["power_w"] for k, v in cells.items() if k[0] == "decode"
             and isinstance(v[3].get("telemetry"), dict) and _pos(v[3]["telemetry"].get("power_w"))]
    by_batch = defaultdict(list)
    for k, v in cells.items():
        if k[0] == "decode" and _pos(v[3].get("power_w_measured")):
            by_batch[k[1]].append(v[3]["power_w_measured"])
    return Measured(backend, sorted({v[2] for v in cells.values()}), dec, pre,
                    statistics.median(power) if power else None, g.shard,
                    {b: statistics.median(w) for b, w in by_batch.items()})


def measured_allreduce(runs: list[Run], hardware_id: str, tp: int) -> tuple[CollectiveCurve, str] | None:
    """The all-reduce curve (bf16 if measured) at world size `tp` of the given runs of this device, with its label:
    nccl points when any run has them, else gloo; several runs merged (the fastest time of each size)."""
    return measured_collective(runs, hardware_id, tp, "all_reduce")


def measured_alltoall(runs: list[Run], hardware_id: str, ep: int) -> tuple[CollectiveCurve, str] | None:
    """The all-to-all curve at world size `ep` (an expert-parallel group's dispatch/combine), as the all-reduce's."""
    return measured_collective(runs, hardware_id, ep, "all_to_all")


def measured_collective(runs: list[Run], hardware_id: str, tp: int, op: str) -> tuple[CollectiveCurve, str] | None:
    if tp < 2:
        return None
    pts = [(r.run_id, p) for r in runs if r.hardware_id == hardware_id for p in r.points
           if p.get("kind") == "collective" and p.get("op") == op and p.get("world_size") == tp
           and usable(p)]
    backends = {p.get("backend") for _, p in pts}
    backend = "nccl" if "nccl" in backends else next(iter(sorted(b for b in backends if b)), None)
    pts = [(r, p) for r, p in pts if p.get("backend") == backend]
    from tokenfleet.measure.parts.collective import collective_curve  # only when a run has collective points

    curve = collective_curve([p for _, p in pts], op)  # every point is at world size tp
    if curve is None:
        return None
    ids = sorted({r for r, p in pts if p.get("dtype") == curve.dtype})
    return curve, f"measured (run {', '.join(ids)}, {backend}, world {tp}, {curve.dtype})"


# ---- efficiencies ----------------------------------------------------------------------------------------------
def efficiency_from_runs(runs: list[Run], dtype: str | None = None, exclude: tuple | None = None,
                         base: Efficiency | None = None, scale=None) -> Efficiency:
    """Median datasheet MFU (prefill) and MBU (decode) of each group's deployable backend, from the projected
    dtype's points when any run has them; tp replica points (their times hold communication) only when no
    other group was measured. `exclude` (hardware_id, model, dtype, tp, shard) leaves out a measured group (its
    own grid is used instead). A field no run measures keeps `base`'s (default: the global defaults; a family's:
    `families.efficiency_for`); `source` names the runs. `scale(hardware_id, "compute"|"memory")` multiplies each
    point's figure first (`families.efficiency_for`: from the measured device's family to the projected one's)."""
    base = base or Efficiency()
    scale = scale or (lambda hw, field: 1.0)
    picked = []
    for key, g in groups(runs).items():
        b = g.deployable()
        if b and key != exclude:
            picked += [(g, v[3], v[2]) for v in g.cells(b).values()]
    if any(not g.replica for g, _, _ in picked):
        picked = [x for x in picked if not x[0].replica]
    same = bool(dtype) and any(g.dtype == dtype for g, _, _ in picked)
    if same:
        picked = [(g, p, r) for g, p, r in picked if g.dtype == dtype]
    mfu = [p["mfu_datasheet"] * scale(g.hardware_id, "compute") for g, p, _ in picked
           if p["kind"] == "prefill" and _pos(p.get("mfu_datasheet"))]
    mbu = [p["mbu_datasheet"] * scale(g.hardware_id, "memory") for g, p, _ in picked
           if p["kind"] == "decode" and _pos(p.get("mbu_datasheet"))]
    if not mfu and not mbu:
        return base
    devices = sorted({f"{g.hardware_id} {g.model} {g.dtype} tp{g.tp}{' shard' if g.shard else ''} {g.deployable()}"
                      for g, _, _ in picked})
    ids = sorted({r for _, _, r in picked})
    # Clamp at 1: above-datasheet figures are byte-count bugs, not efficiencies to extrapolate from.
    e_c = min(statistics.median(mfu), 1.0) if mfu else base.compute
    e_m = min(statistics.median(mbu), 1.0) if mbu else base.memory
    how_c = f"median prefill mfu_datasheet of {len(mfu)} points" if mfu else f"{base.kind} {base.compute:.3g}"
    how_m = (f"median decode mbu_datasheet of {len(mbu)} points (step overhead included)" if mbu
             else f"{base.kind} {base.memory:.3g}")
    overhead = 0.0 if mbu else base.overhead_ms
    src = f"run {', '.join(ids)} ({'; '.join(devices)}): e_c {how_c}, e_m {how_m}"
    if dtype and not same:
        src += f" (no {dtype} points: efficiencies of the dtypes measured)"
    return Efficiency(e_c, e_m, overhead, src, ", ".join(ids), kind="calibrated")
