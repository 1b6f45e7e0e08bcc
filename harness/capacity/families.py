"""Default efficiencies per accelerator family (`configs/efficiency/families.yaml`), validated data.

A family names its datasheet ids and, for e_c (matmul) and e_m (memory), either a published measurement of the family
and of a reference device by one tool — giving e = global default × (achieved/peak) / (ref_achieved/ref_peak) — or
nothing, with `default_reason` saying why the global default stays. `family_efficiency(hw_id)` is what a projection
without a run of that family uses (`Efficiency.kind`: "family default" or "global default").
"""

from __future__ import annotations

import functools
from dataclasses import replace

from pydantic import Field, model_validator
from tokenfleet.capacity.calibrate import (
    DEFAULT_E_C,
    DEFAULT_E_M,
    DEFAULT_OVERHEAD_MS,
    Efficiency,
    efficiency_from_runs,
)
from tokenfleet.config import ConfigError, Strict, config_dir, known_names, load_yaml
from tokenfleet.results import Run

FAMILIES_FILE = config_dir("efficiency") / "families.yaml"
NAMES = {"compute": "e_c", "memory": "e_m"}


class Achieved(Strict):
    """One published measurement of a family's device and of a reference device, same tool and method."""

    achieved: float = Field(gt=0, description="the family's measured TFLOP/s (compute) or GB/s (memory)")
    peak: float = Field(gt=0, description="the datasheet peak it is measured against")
    ref_device: str
    ref_achieved: float = Field(gt=0)
    ref_peak: float = Field(gt=0)
    source: str = Field(min_length=1)
    unverified: bool = Field(False, description="the source could not be identified: recorded, not applied")

    @model_validator(mode="after")
    def _below_peak(self) -> Achieved:
        for what, a, p in (("achieved", self.achieved, self.peak), ("ref_achieved", self.ref_achieved, self.ref_peak)):
            if a > p:
                raise ValueError(f"{what} {a:g} is above its peak {p:g}")
        return self

    @property
    def ratio(self) -> float:
        """The family's achieved fraction over the reference's."""
        return (self.achieved / self.peak) / (self.ref_achieved / self.ref_peak)


class Family(Strict):
    id: str
    gpus: list[str] = Field(min_length=1)
    compute: Achieved | None = None
    memory: Achieved | None = None
    default_reason: str | None = Field(None, description="why a field left out keeps the global default")

    @model_validator(mode="after")
    def _reasoned(self) -> Family:
        if not (applied(self.compute) and applied(self.memory)) and not self.default_reason:
            raise ValueError("give `default_reason` for the field(s) that keep the global default")
        return self


class Families(Strict):
    reference: str
    families: list[Family] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Families:
        seen: dict[str, str] = {}
        for f in self.families:
            for g in f.gpus:
                if g in seen:
                    raise ValueError(f"gpu {g!r} is in families {seen[g]!r} and {f.id!r}")
                seen[g] = f.id
        return self


def load_families(path=None) -> Families:
    """The families file (default: configs/efficiency/families.yaml), validated; an unknown datasheet id is a
    ConfigError naming file and field."""
    path = path or FAMILIES_FILE
    fam = load_yaml(path, Families)
    known = known_names("hardware")
    for i, f in enumerate(fam.families):
        for j, g in enumerate(f.gpus):
            if g not in known:
                raise ConfigError(path, f"families.{i}.gpus.{j}", f"unknown gpu {g!r}; known: {', '.join(known)}")
    return fam


@functools.cache
def _families() -> Families:
    return load_families()


def applied(a: Achieved | None) -> bool:
    """A measurement moves a default only when its source can be checked: an `unverified` one (a source whose
    repository or publisher could not be identified) is recorded in the file, shown, and not applied."""
    return a is not None and not a.unverified


def family_of(hardware_id: str | None, families: Families | None = None) -> Family | None:
    return next((f for f in (families or _families()).families if hardware_id in f.gpus), None)


def same_family(a: str | None, b: str | None) -> bool:
    """Two datasheet ids of one family (or the same id)."""
    if a is None or b is None:
        return False
    fa = family_of(a)
    return a == b or (fa is not None and fa is family_of(b))


def family_efficiency(hardware_id: str | None, families: Families | None = None) -> Efficiency:
    """The default efficiencies of this device's family: a field with a published measurement is scaled from the
    global default (module docstring); the rest keep it. `kind` says "family default" when any field was scaled."""
    fam = family_of(hardware_id, families)
    scaled = {k: a for k, a in (("compute", fam.compute), ("memory", fam.memory)) if applied(a)} if fam else {}
    if not scaled:
        why = f"family {fam.id}: {fam.default_reason}" if fam else f"{hardware_id} is in no family"
        return Efficiency(source=f"global defaults (e_c {DEFAULT_E_C:g}, e_m {DEFAULT_E_M:g}, "
                                 f"{DEFAULT_OVERHEAD_MS:g} ms/forward: assumptions, calibrate.py; {why})")
    base = {"compute": DEFAULT_E_C, "memory": DEFAULT_E_M}
    vals = {k: min(v * scaled[k].ratio, 1.0) if k in scaled else v for k, v in base.items()}
    parts = [f"{NAMES[k]} {vals[k]:.3f} = {base[k]:g} × ({a.achieved:g}/{a.peak:g}) / "
             f"({a.ref_achieved:g}/{a.ref_peak:g} on {a.ref_device})"
             for k, a in scaled.items()]
    parts += [f"{NAMES[k]} {base[k]:g} global default" for k in base if k not in scaled]
    return Efficiency(vals["compute"], vals["memory"], DEFAULT_OVERHEAD_MS,
                      f"family default {fam.id} ({FAMILIES_FILE.parent.name}/{FAMILIES_FILE.name}): "
                      + "; ".join(parts), kind="family default")


def family_ratio(hardware_id: str | None, field: str, families: Families | None = None) -> float:
    """The family's achieved fraction over the reference's for `field` (compute | memory); 1 where none is published
    (the global default's reference) or the device is in no family."""
    fam = family_of(hardware_id, families)
    a = getattr(fam, field) if fam else None
    return a.ratio if applied(a) else 1.0


def efficiency_for(runs: list[Run], hardware_id: str | None, dtype: str | None = None,
                   exclude: tuple | None = None) -> Efficiency:
    """The efficiencies a projection on `hardware_id` uses where no grid measured it: the given runs' (`calibrated`:
    `calibrate.efficiency_from_runs`), each point's MFU/MBU carried from its device's family to this one's by the
    families' ratios (a run of the same family: unchanged); a field no run measures from this device's family
    default (`family_efficiency`); without runs, the family default or the global one."""
    def scale(src: str | None, field: str) -> float:
        return family_ratio(hardware_id, field) / family_ratio(src, field)

    eff = efficiency_from_runs(runs, dtype, exclude, base=family_efficiency(hardware_id), scale=scale)
    carried = sorted({r.hardware_id for r in runs if r.hardware_id and not same_family(r.hardware_id, hardware_id)
                      and any(scale(r.hardware_id, f) != 1.0 for f in NAMES)})
    if eff.kind == "calibrated" and carried:
        eff = replace(eff, source=f"{eff.source}; {', '.join(carried)} carried to {hardware_id}'s family by the "
                                  f"family ratios ({FAMILIES_FILE.parent.name}/{FAMILIES_FILE.name})")
    return eff


__all__ = ["Achieved", "Families", "Family", "efficiency_for", "family_efficiency", "family_of", "family_ratio",
           "load_families", "same_family"]
