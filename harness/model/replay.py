"""Routing replayed from a file: the `replay` routing condition of an MoE model point (`parts.model.Routing`, label
`replay:<id>@<sha256[:12]>`, the file's id and the hash of its bytes).

A routing file (YAML, `configs/routing/<id>.yaml` or any path) records what a real router did, per MoE layer:

    id: <name>                 # the file's name under configs/routing/
    description: <text>
    source: <where the routing was recorded>
    experts: E                 # routed experts per layer
    topk: k                    # experts per token
    layers:                    # one entry per MoE layer (or one for every layer), each either
      - histogram: [c_0, ..., c_{E-1}]   # (token, slot) pairs routed to each expert
      - tokens: [[e, ...], ...]          # per token its k distinct expert ids, in [0, E)

A model replays a file's per-layer expert popularity p_e = c_e / Σc (a tokens layer is counted into its histogram) as
a bias ln p_e on each MoE layer's router choice scores (`replay_skew`; an expert never chosen gets half a pair's
share, so a top-k always has k candidates): the router's own scores on the point's tokens spread the choice around
the file's popularity, and what it produced is the point's `tokens_per_expert`, as for `zipf`. Layer j of the model
replays layer j of the file (a one-layer file: every layer). Every problem is a ConfigError naming the file and the
field (exit 2 at the CLI).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from tokenfleet.config import ConfigError, Strict, check_id, load_yaml, resolve


class ReplayLayer(Strict):
    histogram: list[NonNegativeInt] | None = Field(None, description="(token, slot) pairs routed to each expert")
    tokens: list[list[NonNegativeInt]] | None = Field(None, description="per token, its k expert ids")


class RoutingFile(Strict):
    id: str
    description: str
    source: str
    experts: PositiveInt
    topk: PositiveInt
    layers: list[ReplayLayer] = Field(min_length=1)


@dataclass(frozen=True)
class Replay:
    """A loaded routing file: its content, path and the sha256 of its bytes."""

    file: RoutingFile
    path: Path
    sha256: str

    @property
    def label(self) -> str:
        return f"replay:{self.file.id}@{self.sha256[:12]}"

    def histograms(self) -> torch.Tensor:
        """[file layers, E] float64: each layer's pairs per expert."""
        e = self.file.experts
        rows = []
        for layer in self.file.layers:
            if layer.histogram is not None:
                rows.append(torch.tensor(layer.histogram, dtype=torch.float64))
            else:
                ids = torch.tensor(layer.tokens, dtype=torch.int64).reshape(-1)
                rows.append(torch.bincount(ids, minlength=e).to(torch.float64))
        return torch.stack(rows)


def _check(rf: RoutingFile, path: Path) -> None:
    e, k = rf.experts, rf.topk
    if k > e:
        raise ConfigError(path, "topk", f"{k} experts per token of {e}")
    for i, layer in enumerate(rf.layers):
        where = f"layers.{i}"
        if (layer.histogram is None) == (layer.tokens is None):
            raise ConfigError(path, where, "give one of histogram or tokens")
        if layer.histogram is not None:
            if len(layer.histogram) != e:
                raise ConfigError(path, f"{where}.histogram", f"{len(layer.histogram)} counts for {e} experts")
            if sum(layer.histogram) == 0:
                raise ConfigError(path, f"{where}.histogram", "every count is 0")
            continue
        if not layer.tokens:
            raise ConfigError(path, f"{where}.tokens", "no tokens")
        for t, ids in enumerate(layer.tokens):
            if len(ids) != k or len(set(ids)) != k or max(ids) >= e:
                raise ConfigError(path, f"{where}.tokens.{t}",
                                  f"{ids} is not {k} distinct expert ids in [0, {e})")


def load_replay(name_or_path: str | Path) -> Replay:
    """A routing file by name (configs/routing/<name>.yaml) or path, validated; a problem names file and field."""
    path = resolve("routing", name_or_path)
    rf = load_yaml(path, RoutingFile)
    check_id("routing", path, rf.id)
    _check(rf, path)
    return Replay(rf, path, hashlib.sha256(path.read_bytes()).hexdigest())


def replay_skew(replay: Replay, moe_layers: int, experts: int, topk: int, device) -> torch.Tensor:
    """[moe_layers, E] fp32: ln p_e per MoE layer (module docstring), for a model of `experts` routed experts and
    `topk` per token; a file of other sizes, or of fewer layers than the model (but one), is a ConfigError."""
    rf, path = replay.file, replay.path
    if rf.experts != experts:
        raise ConfigError(path, "experts", f"{rf.experts} experts; the model routes over {experts}")
    if rf.topk != topk:
        raise ConfigError(path, "topk", f"{rf.topk} experts per token; the model picks {topk}")
    n = len(rf.layers)
    if 1 < n < moe_layers:
        raise ConfigError(path, "layers", f"{n} layers for a model of {moe_layers} MoE layers (give 1 or at least "
                          f"{moe_layers})")
    h = replay.histograms()
    h = h[[0] * moe_layers] if n == 1 else h[:moe_layers]
    total = h.sum(1, keepdim=True)
    p = torch.where(h > 0, h, torch.full_like(h, 0.5)) / total
    return p.log().to(device=device, dtype=torch.float32)
