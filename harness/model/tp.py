"""Tensor parallelism, Megatron-style, over torch.distributed: the decoder of `tokenfleet.model.decoder` sharded.

Each of p ranks holds one shard (the shapes of `decoder.shard_config`): column-parallel fused QKV (its q heads and
their kv heads: kv heads are split when there are at least p of them, else each rank keeps the one its q heads
share) and fused gate/up (intermediate/p); row-parallel O and down, whose partial sums meet in one all-reduce after
attention and one after the MLP; a vocabulary-parallel embedding (rows V/p, an all-reduce of the looked-up rows)
and LM head (rows V/p, an all-gather of the logits). Norms are replicated. The layer code is the decoder's own:
`TPTransformer` overrides only `_embed`, `_reduce` and `_logits` to add the collectives, so every eager backend
(`load_ops`) runs sharded as it runs whole. The step has no host sync, so it can be captured in a CUDA graph with
its NCCL collectives.

`comm=False` gives the same step without its collectives (each rank's local work only), which the tp part times to
say how much of a step was communication.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.distributed as dist
from tokenfleet.model import decoder as M
from tokenfleet.model.spec import ModelConfig


def _rows(t: torch.Tensor | None, start: int, stop: int, padded: int) -> torch.Tensor | None:
    """Rows [start, stop) of t, zero-padded to `padded` rows (a shard of a dimension not divisible by p)."""
    if t is None:
        return None
    part = t[start:stop]
    if part.shape[0] < padded:
        pad = torch.zeros((padded - part.shape[0], *part.shape[1:]), dtype=t.dtype, device=t.device)
        part = torch.cat([part, pad])
    return part.contiguous()


def _kv_heads(cfg: ModelConfig, rank: int, tp: int) -> range:
    """The kv heads rank `rank` holds: a slice when kv_heads >= tp, else the one its q heads share."""
    kv = cfg.num_kv_heads
    if kv >= tp:
        return range(rank * kv // tp, (rank + 1) * kv // tp)
    return range(rank * kv // tp, rank * kv // tp + 1)


def shard_layer(cfg: ModelConfig, lw: M.Layer, rank: int, tp: int) -> M.Layer:
    hd, hq = cfg.head_dim, cfg.num_heads
    q0, q1 = rank * hq // tp * hd, (rank + 1) * hq // tp * hd
    kv = _kv_heads(cfg, rank, tp)
    k_off, v_off = hq * hd, (hq + cfg.num_kv_heads) * hd
    rows = [*range(q0, q1), *(k_off + h * hd + i for h in kv for i in range(hd)),
            *(v_off + h * hd + i for h in kv for i in range(hd))]
    idx = torch.tensor(rows, device=lw.wqkv.device)
    inter = cfg.intermediate_size
    ip = math.ceil(inter / tp)
    i0, i1 = rank * ip, min((rank + 1) * ip, inter)
    gate, up = lw.w13[:inter], lw.w13[inter:]
    return M.Layer(
        attn_norm=lw.attn_norm, wqkv=lw.wqkv[idx].contiguous(),
        bqkv=None if lw.bqkv is None else lw.bqkv[idx].contiguous(), q_norm=lw.q_norm, k_norm=lw.k_norm,
        wo=lw.wo[:, q0:q1].contiguous(), mlp_norm=lw.mlp_norm,
        w13=torch.cat([_rows(gate, i0, i1, ip), _rows(up, i0, i1, ip)]),
        w2=_rows(lw.w2.T, i0, i1, ip).T.contiguous(),
    )


def shard_weights(cfg: ModelConfig, w: M.Weights, rank: int, tp: int) -> M.Weights:
    """Rank `rank`'s shard of full weights `w` (of the unsharded `cfg`), in the shapes of shard_config(cfg, tp)."""
    vp = math.ceil(cfg.vocab_size / tp)
    v0, v1 = rank * vp, min((rank + 1) * vp, cfg.vocab_size)
    embed = _rows(w.embed, v0, v1, vp)
    head = embed if w.lm_head is w.embed else _rows(w.lm_head, v0, v1, vp)
    return M.Weights(embed=embed, layers=[shard_layer(cfg, lw, rank, tp) for lw in w.layers], norm=w.norm,
                     lm_head=head)


class TPTransformer(M.Transformer):
    """One rank's shard of the decoder. `vocab_size`: the full vocabulary (the shard's config holds V/p)."""

    def __init__(self, cfg: ModelConfig, weights: M.Weights, backend: str = "torch", *, rank: int, tp: int,
                 vocab_size: int, group=None, comm: bool = True):
        super().__init__(cfg, weights, backend)
        self.rank, self.tp, self.vocab_size, self.group, self.comm = rank, tp, vocab_size, group, comm
        self.vocab_start = rank * cfg.vocab_size

    def _like(self, cfg: ModelConfig, weights: M.Weights, backend: str, comm: bool) -> TPTransformer:
        return TPTransformer(cfg, weights, backend, rank=self.rank, tp=self.tp, vocab_size=self.vocab_size,
                             group=self.group, comm=comm)

    def with_backend(self, backend: str) -> TPTransformer:
        return self._like(self.cfg, self.weights, backend, self.comm)

    def with_layers(self, n: int) -> TPTransformer:
        return self._like(M.with_layers(self.cfg, n), replace(self.weights, layers=self.weights.layers[:n]),
                          self.backend, self.comm)

    def with_comm(self, comm: bool) -> TPTransformer:
        """The same shard and backend, with or without its collectives (False: for timing the local work)."""
        return self._like(self.cfg, self.weights, self.backend, comm)

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.comm:
            dist.all_reduce(x, group=self.group)
        return x

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        # Vocabulary-parallel: rows outside this rank's [start, start + V/p) look up row 0 and are zeroed, then the
        # ranks' rows are summed (each token's row lives on exactly one rank). No host sync.
        local = tokens - self.vocab_start  # [T]
        inside = (local >= 0) & (local < self.cfg.vocab_size)
        h = super()._embed(torch.where(inside, local, torch.zeros_like(local)))  # [T, D]
        return self._all_reduce(h * inside.unsqueeze(-1).to(h.dtype))

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        # Row-parallel O and down: each rank's heads / intermediate slice give a partial sum.
        return self._all_reduce(h)

    def _logits(self, y: torch.Tensor) -> torch.Tensor:
        local = super()._logits(y)  # [N, V/p]
        if not self.comm:
            return local
        n, vp = local.shape
        out = torch.empty((self.tp * n, vp), dtype=local.dtype, device=local.device)  # [p·N, V/p]: rank-major
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
        gather(out, local.contiguous(), group=self.group)
        return out.view(self.tp, n, vp).permute(1, 0, 2).reshape(n, self.tp * vp)[:, :self.vocab_size]  # [N, V]


def tp_from_full(model: M.Transformer, rank: int, tp: int, group=None) -> TPTransformer:
    """Rank `rank`'s shard of an unsharded model (same backend): what tests compare against the whole model."""
    cfg = model.cfg
    return TPTransformer(M.shard_config(cfg, tp), shard_weights(cfg, model.weights, rank, tp), model.backend,
                         rank=rank, tp=tp, vocab_size=cfg.vocab_size, group=group)


def build_tp_model(cfg: ModelConfig, rank: int, tp: int, backend: str = "torch", dtype: str = "bf16",
                   device: str | torch.device = "cpu", seed: int = 0, layers: int | None = None,
                   group=None) -> TPTransformer:
    """A shard with seeded random weights drawn directly in the shard's shapes (each rank its own seed), for
    timing: never the whole model on one device."""
    shard = M.shard_config(cfg, tp)
    if layers is not None:
        shard = M.with_layers(shard, min(layers, shard.num_layers))
    weights = M.random_weights(shard, dtype, device, seed + 7919 * rank)
    return TPTransformer(shard, weights, backend, rank=rank, tp=tp, vocab_size=cfg.vocab_size, group=group)
