"""Capacity-planning configs: workloads, demand scenarios and fleets (`configs/{workloads,demand,fleets}/`).

Every count and every planning knob carries a source or says it is an assumption, with a reason.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Literal

from pydantic import Field, model_validator
from tokenfleet.config import Strict, load_all, load_named

SHARE_TOL = 1e-6


class Workload(Strict):
    id: str
    description: str
    input_len: int = Field(gt=0, description="prompt tokens I")
    output_len: int = Field(gt=0, description="generated tokens O")
    prefix_cache_hit: float = Field(0.0, ge=0, lt=1, description="fraction h of the prompt already in the KV cache")
    ttft_ms: float = Field(gt=0, allow_inf_nan=True, description="time-to-first-token limit (.inf: none)")
    tpot_ms: float = Field(gt=0, allow_inf_nan=True, description="time-per-output-token limit (.inf: none)")
    count: Literal["total", "output"] = Field(description="which tokens demand counts: input+output, or output only")
    assumption: str | None = None
    source: str | None = None


class DemandPoint(Strict):
    date: dt.date
    tokens_per_day: float = Field(gt=0)
    statement: str
    source: str
    unverified: bool = False


class Demand(Strict):
    id: str
    description: str
    metric: str
    kind: Literal["reported", "primary"]
    pair: str | None = Field(None, description="the other side of a reported/primary pair")
    counts: Literal["total", "output", "unknown"]
    counts_note: str
    why_differs: str = Field(description="one line: why this figure differs from its pair")
    points: list[DemandPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _dated(self) -> Demand:
        dates = [p.date for p in self.points]
        if dates != sorted(dates):
            raise ValueError("points must be in date order")
        return self

    @property
    def latest(self) -> DemandPoint:
        return self.points[-1]


class CountRange(Strict):
    """A published range around a GPU count: the headline carries low / central / high capacity."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)
    source: str

    @model_validator(mode="after")
    def _ordered(self) -> CountRange:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class FleetGpu(Strict):
    gpu: str
    count: int = Field(ge=0)
    count_range: CountRange | None = Field(None, description="published low/high estimates around `count`")
    tp: int | None = Field(None, gt=0, description="GPUs per replica; default: the 1,2,4,8,16 with most tokens/s/GPU")
    source: str | None = None
    assumption: bool = False
    reason: str | None = None

    @model_validator(mode="after")
    def _sourced(self) -> FleetGpu:
        if not self.source and not (self.assumption and self.reason):
            raise ValueError("give a `source`, or `assumption: true` with a `reason`")
        if self.count_range and not self.count_range.low <= self.count <= self.count_range.high:
            lo, hi = self.count_range.low, self.count_range.high
            raise ValueError(f"count {self.count} is outside count_range {lo}..{hi}")
        return self


class ModelShare(Strict):
    model: str
    share: float = Field(gt=0, le=1)
    dtype: Literal["bf16", "fp16", "fp8"] | None = None


class WorkloadShare(Strict):
    workload: str
    share: float = Field(gt=0, le=1)


def _sums_to_one(items: list, what: str) -> None:
    total = sum(i.share for i in items)
    if not math.isclose(total, 1.0, abs_tol=SHARE_TOL):
        raise ValueError(f"{what} shares sum to {total:g}, not 1")


class FleetDeployment(Strict):
    """How the fleet serves one of its models (`configs/deployments`, by name or path relative to the fleet file),
    on the GPU types listed (default: all); models without one are served as tensor-parallel replicas."""

    model: str
    deployment: str
    gpus: list[str] | None = None
    source: str


class Fleet(Strict):
    id: str
    description: str
    gpus: list[FleetGpu] = Field(min_length=1)
    utilization: float = Field(1.0, gt=0, le=1, description="fraction of the day the GPUs serve at the planned batch")
    peak_factor: float = Field(1.0, ge=1, description="peak-hour demand / average demand")
    pue: float = Field(1.0, ge=1, description="facility power / IT power")
    models: list[ModelShare] = Field(min_length=1)
    workloads: list[WorkloadShare] = Field(min_length=1)
    # Deployment parameters (None: the engine defaults of tokenfleet.capacity.project.default_deployment).
    kv_dtype: Literal["bf16", "fp16", "fp8"] | None = Field(None, description="KV-cache dtype")
    batch_cap: int | None = Field(None, gt=0, description="max sequences per replica (vLLM max_num_seqs)")
    max_batched_tokens: int | None = Field(None, gt=0, description="token budget per engine step (chunked prefill)")
    deployments: list[FleetDeployment] = Field(default_factory=list, description="per model: its serving deployment")
    assumptions: dict[str, str] = Field(default_factory=dict, description="field -> why this value was assumed")
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Fleet:
        _sums_to_one(self.models, "models")
        _sums_to_one(self.workloads, "workloads")
        for f in ("utilization", "peak_factor", "pue", "kv_dtype", "batch_cap", "max_batched_tokens"):
            if f in self.model_fields_set and f not in self.assumptions and f not in self.sources:
                raise ValueError(f"{f} is set without a source or an `assumptions.{f}` reason")
        return self


def load_workload(name: str) -> Workload:
    return load_named("workloads", name, Workload)


def load_demand(name: str) -> Demand:
    return load_named("demand", name, Demand)


def load_fleet(name: str) -> Fleet:
    return load_named("fleets", name, Fleet)


def all_workloads() -> dict[str, Workload]:
    return load_all("workloads", Workload)


def all_demand() -> dict[str, Demand]:
    return load_all("demand", Demand)


def all_fleets() -> dict[str, Fleet]:
    return load_all("fleets", Fleet)
