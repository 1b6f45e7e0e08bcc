"""Configs as validated data: YAML files read into pydantic models (`extra="forbid"`).

Every failure to read a config becomes one `ConfigError` naming the file and the field, which the CLI prints
as a single line and exits 2 on. Nothing here knows about devices or runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

PACKAGE_DIR = Path(__file__).resolve().parent  # the `tokenfleet` package: harness/ in a checkout
# A source checkout (the package imported from its harness/ folder, `pip install -e .` or PYTHONPATH) has configs/ and
# results/ beside it; an installed wheel carries configs/ inside the package and has no checkout.
CHECKOUT_ROOT: Path | None = (PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "configs").is_dir()
                              and (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None)
CONFIG_ROOT = Path(os.environ.get("TOKENFLEET_CONFIGS")
                   or (CHECKOUT_ROOT / "configs" if CHECKOUT_ROOT else PACKAGE_DIR / "configs"))

T = TypeVar("T", bound=BaseModel)


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, not silently ignored, and every number is finite
    (inf and NaN are refused: no field here means "unlimited" by infinity)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ConfigError(Exception):
    """A user-input error: one line, naming the file and the field. Exit code 2 at the CLI."""

    def __init__(self, file: str | Path | None, field: str | None, message: str):
        self.file, self.field, self.message = (str(file) if file else None), field, message
        where = ": ".join(p for p in (self.file, self.field) if p)
        super().__init__(f"{where}: {message}" if where else message)


def validation_error(file: str | Path | None, err: ValidationError) -> ConfigError:
    """The first validation error of `err` as a ConfigError (field path joined with dots)."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    return ConfigError(file, field, first["msg"])


def read_text(path: str | Path) -> str:
    """The one reader of every text file tokenfleet takes (configs, suites, fleets, run manifests and points): its
    bytes decoded as UTF-8; a missing, unreadable or non-UTF-8 file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, None, "file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    return decode(path, data)


def decode(path: str | Path, data: bytes, where: str | None = None) -> str:
    """`data` (read from `path`) as UTF-8 text, or a ConfigError naming the file, the place and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(path, where or f"line {line}", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                          f"{e.start}): save the file as UTF-8") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing a key given twice in one mapping (YAML says keys are unique; PyYAML keeps the
    last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:
                pass  # an unhashable key: construct_mapping below says so
        return super().construct_mapping(node, deep)


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, again: int):
        self.key, self.first, self.again = key, first, again


def read_yaml(path: str | Path) -> object:
    path = Path(path)
    text = read_text(path)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as e:
        raise ConfigError(path, f"line {e.again}", f"key {e.key!r} given twice (first on line {e.first}): "
                          "keep one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}" if mark else None
        raise ConfigError(path, line, f"not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # a scalar yaml cannot build
        raise ConfigError(path, None, f"not valid YAML ({type(e).__name__}: {e})") from None


def load_yaml(path: str | Path, cls: type[T]) -> T:
    """Read `path` and validate it as `cls`; any problem is a ConfigError naming file and field."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, None, f"expected a mapping at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise validation_error(path, e) from None


def config_dir(kind: str) -> Path:
    return CONFIG_ROOT / kind


def known_names(kind: str) -> list[str]:
    return sorted(p.stem for p in config_dir(kind).glob("*.yaml"))


def resolve(kind: str, name_or_path: str | Path) -> Path:
    """A config given by name (`configs/<kind>/<name>.yaml`) or by path; unknown names list the known ones."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(p, None, "file not found")
        return p
    candidate = config_dir(kind) / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(known_names(kind)) or "(none)"
        raise ConfigError(config_dir(kind), kind.rstrip("s"), f"unknown name {str(name_or_path)!r}; known: {known}")
    return candidate


def shown_path(p: str | Path) -> str:
    """A config file's path as a report records it: `configs/<kind>/<file>` for a file of the config tree (wherever
    the checkout or wheel lies), else relative to the working folder when under it, else as given."""
    q = Path(p).resolve()
    for root, label in ((CONFIG_ROOT.resolve(), "configs"), (Path.cwd().resolve(), None)):
        if q.is_relative_to(root):
            rel = q.relative_to(root).as_posix()
            return f"{label}/{rel}" if label else rel
    return str(p)


def load_named(kind: str, name_or_path: str | Path, cls: type[T]) -> T:
    """Load a config by name or path and check that a named file's `id` matches its file name."""
    path = resolve(kind, name_or_path)
    obj = load_yaml(path, cls)
    check_id(kind, path, getattr(obj, "id", None))
    return obj


def check_id(kind: str, path: Path, obj_id: str | None) -> None:
    """A file under configs/<kind>/ is named after its `id`, so a name finds exactly one file."""
    if obj_id is not None and path.resolve().parent == config_dir(kind).resolve() and obj_id != path.stem:
        raise ConfigError(path, "id", f"{obj_id!r} does not match the file name {path.stem!r}")


def load_all(kind: str, cls: type[T]) -> dict[str, T]:
    return {name: load_named(kind, name, cls) for name in known_names(kind)}
