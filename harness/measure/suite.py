"""Suites (`configs/suites/*.yaml`): what a run measures, as validated data.

The top level is checked here; each part's section (`ceilings`, `kernels`, `prefill`, `decode`) is checked by
that part's own `Spec`, and errors name the file and the field (`kernels.ops.0.op`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from tokenfleet.config import ConfigError, Strict, check_id, read_yaml, resolve, validation_error
from tokenfleet.measure.parts import PARTS


class TimingSpec(Strict):
    min_samples: int = Field(10, ge=1)
    min_time_s: float = Field(0.2, gt=0)
    warmup_s: float = Field(0.1, ge=0)
    max_samples: int = Field(1000, ge=1)


class SuiteFile(Strict):
    id: str
    description: str
    device: Literal["cpu", "cuda", "any"] = "any"
    noise_limit: float = Field(0.1, gt=0, description="(p80-p20)/median above which a point is `noisy`")
    timing: TimingSpec = TimingSpec()
    ceilings: dict[str, Any] | None = None
    kernels: dict[str, Any] | None = None
    prefill: dict[str, Any] | None = None
    decode: dict[str, Any] | None = None
    collectives: dict[str, Any] | None = None  # run on N ranks: `tokenfleet bench --nproc N`
    tp: dict[str, Any] | None = None


class Suite:
    """A validated suite: the file's top level plus one Spec object per part present."""

    def __init__(self, file: SuiteFile, parts: dict[str, BaseModel], path: str):
        self.file, self.parts, self.path = file, parts, path

    @property
    def id(self) -> str:
        return self.file.id

    def resolved(self) -> dict:
        out = self.file.model_dump(exclude={n for n in PARTS})
        out.update({name: spec.model_dump() for name, spec in self.parts.items()})
        return out


def part_api(name: str) -> tuple[type[BaseModel], Any]:
    return PARTS[name]


def suite_from_dict(data: dict, path: str) -> Suite:
    """Validate a suite's data (a file's, or a run manifest's resolved `config`); errors name `path` and the field."""
    try:
        file = SuiteFile.model_validate(data)
    except ValidationError as e:
        raise validation_error(path, e) from None
    parts: dict[str, BaseModel] = {}
    for name in PARTS:
        section = getattr(file, name)
        if section is None:
            continue
        spec_cls, _ = part_api(name)
        try:
            parts[name] = spec_cls.model_validate(section)
        except ValidationError as e:
            err = validation_error(path, e)
            raise ConfigError(path, f"{name}.{err.field}" if err.field else name, err.message) from None
    if not parts:
        raise ConfigError(path, None, f"a suite needs at least one of: {', '.join(PARTS)}")
    for name, length in (("prefill", "prompt_len"), ("decode", "context")):
        if name in parts:
            check_context(parts[name], name, length, path)
    return Suite(file, parts, str(path))


def check_context(spec: BaseModel, part: str, length: str, path: str) -> None:
    """Every length a model section asks for (its grid's and its fp8 grid's) fits each of its models' context window
    (max_position_embeddings), as `project` refuses a workload that does not: a longer one is refused at load, not
    measured past what the model was built for."""
    from tokenfleet.model.spec import load_model_config

    grids = [("", spec)] + ([("fp8.", spec.fp8)] if getattr(spec, "fp8", None) else [])
    for prefix, grid in grids:
        lengths = getattr(grid, length) or getattr(spec, length)
        for m in grid.models or spec.models:
            limit = load_model_config(m).max_position_embeddings
            for i, n in enumerate(lengths):
                if n > limit:
                    raise ConfigError(path, f"{part}.{prefix}{length}.{i}",
                                      f"{n} tokens exceed {m}'s context of {limit}")


def load_suite(name_or_path: str) -> Suite:
    """A suite by name (configs/suites/) or path: read once, validated once, its id matching its file name."""
    path = resolve("suites", name_or_path)
    suite = suite_from_dict(read_yaml(path), str(path))
    check_id("suites", path, suite.id)
    return suite
