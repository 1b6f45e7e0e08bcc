"""A decoder-only transformer (Llama, Qwen2, Qwen3 dense) over the kernels, gpt-fast style.

One set of weights, two backends: `triton` runs the Triton kernels of `kernels/`, `torch` PyTorch (the kernels'
`_ref` references, with F.linear and SDPA for gemm and attention: see `load_ops`). QKV is one fused weight and
gate/up another (one gemm each instead of three and two). The KV cache is static, `[L, B, Hkv, S_max, D]`,
allocated up front with per-sequence lengths, so a decode step allocates nothing from the host and has no host
sync: it can be captured in a CUDA graph (`DecodeGraph`).

Generation, as in gpt-fast: `prefill`, `decode_one_token`, `decode_n_tokens` (and `generate` around them).
Weights are seeded random (`build_model`) or read from a local Hugging Face folder (`harness.model.hf`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from harness.dtypes import to_dtype
from harness.model.spec import (  # noqa: F401  (the counts live on the spec; re-exported for callers)
    ModelConfig,
    decode_bytes,
    decode_flops,
    layer_params,
    load_model_config,
    param_counts,
    prefill_bytes,
    prefill_flops,
    tp_problem,
)

BACKENDS = ("triton", "torch", "ref")  # "ref": pure references, for tests
OPS = ("gemm", "rmsnorm", "rope", "silu_mul", "attention_prefill", "attention_decode")


@dataclass(frozen=True)
class Ops:
    """The six ops a layer needs, from one backend."""

    gemm: object
    rmsnorm: object
    rope: object
    silu_mul: object
    attention_prefill: object
    attention_decode: object


@functools.cache
def load_ops(backend: str) -> Ops:
    """`triton`: the Triton kernels. `torch`: each op's vendor baseline (`kernels.REGISTRY[op].baseline`: F.linear,
    SDPA, grouped matmuls for decode attention; the reference where no faster torch path exists). `ref`: the torch
    references (fp32 math throughout), for tests."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    from kernels import REGISTRY

    attr = {"triton": "triton", "torch": "baseline", "ref": "reference"}[backend]
    return Ops(**{op: getattr(REGISTRY[op], attr) for op in OPS})


# ---------------------------------------------------------------------------------------------------------------
# Shapes (counts: harness.model.spec, of the config given: pass a tp shard or a layer subset)


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-GPU shapes under tensor parallelism p: heads/p, kv_heads/p (at least 1: replicated when
    kv_heads < p), intermediate/p, vocab/p (vocab-parallel embedding and LM head). Hidden size is unchanged."""
    if tp == 1:
        return cfg
    problem = tp_problem(cfg, tp)
    if problem:
        raise ValueError(problem)
    return cfg.model_copy(update=dict(
        num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=math.ceil(cfg.intermediate_size / tp), vocab_size=math.ceil(cfg.vocab_size / tp),
    ))


def with_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    return cfg if n == cfg.num_layers else cfg.model_copy(update=dict(num_layers=n))


# ---------------------------------------------------------------------------------------------------------------
# Weights


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(Hq + 2·Hkv)·hd, D]: q rows, then k, then v
    bqkv: torch.Tensor | None  # [(Hq + 2·Hkv)·hd] (Qwen2)
    q_norm: torch.Tensor | None  # [hd] (Qwen3)
    k_norm: torch.Tensor | None  # [hd]
    wo: torch.Tensor  # [D, Hq·hd]
    mlp_norm: torch.Tensor  # [D]
    w13: torch.Tensor  # [2·I, D]: gate rows, then up rows
    w2: torch.Tensor  # [D, I]


@dataclass
class Weights:
    embed: torch.Tensor  # [V, D]
    layers: list[Layer]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]; the embedding tensor itself when tied


def random_weights(cfg: ModelConfig, dtype: str | torch.dtype = "bf16", device: str | torch.device = "cpu",
                   seed: int = 0) -> Weights:
    """Seeded random weights scaled so activations stay finite and non-degenerate through every layer:
    projections uniform with std 1/sqrt(fan_in) (unit-variance outputs from unit-variance inputs), embedding
    std 1, norm weights 1 ± 0.1. (Uniform, not normal: the same scale, and several times faster to draw on CPU.)"""
    dt, dev = to_dtype(dtype), torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed)
    d, hd, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size

    def u(shape, std):
        a = std * math.sqrt(3.0)
        return torch.empty(shape, dtype=dt, device=dev).uniform_(-a, a, generator=gen)

    def norm(n):
        return torch.empty(n, dtype=dt, device=dev).uniform_(0.9, 1.1, generator=gen)

    qkv = (hq + 2 * hkv) * hd
    layers = [
        Layer(
            attn_norm=norm(d), wqkv=u((qkv, d), d**-0.5), bqkv=u(qkv, 0.1) if cfg.attention_bias else None,
            q_norm=norm(hd) if cfg.qk_norm else None, k_norm=norm(hd) if cfg.qk_norm else None,
            wo=u((d, hq * hd), (hq * hd) ** -0.5), mlp_norm=norm(d), w13=u((2 * inter, d), d**-0.5),
            w2=u((d, inter), inter**-0.5),
        )
        for _ in range(cfg.num_layers)
    ]
    embed = u((cfg.vocab_size, d), 1.0)
    lm_head = embed if cfg.tie_word_embeddings else u((cfg.vocab_size, d), d**-0.5)
    return Weights(embed=embed, layers=layers, norm=norm(d), lm_head=lm_head)


# ---------------------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Static KV cache for (batch, max context), allocated once: k, v [L, B, Hkv, S_max, hd]; `lengths` [B] int32
    counts the tokens stored per sequence (the next token of sequence b goes to position lengths[b])."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device = "cpu"):
        dt, dev = to_dtype(dtype), torch.device(device)
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        # Zeros, not empty: masked-out positions are multiplied by 0 in attention, and 0·NaN would be NaN.
        self.k = torch.zeros(shape, dtype=dt, device=dev)
        self.v = torch.zeros(shape, dtype=dt, device=dev)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=dev)
        # Row of (b, h, position 0) in k[i].view(-1, hd): a decode step adds its positions to it (one index_put
        # per layer and tensor, no host sync).
        b = torch.arange(batch, device=dev)[:, None]
        h = torch.arange(cfg.num_kv_heads, device=dev)[None, :]
        self.slot_base = (b * cfg.num_kv_heads + h) * max_len  # [B, Hkv] int64
        self.batch, self.max_len = batch, max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def reset(self) -> None:
        self.lengths.zero_()

    def fill_random(self, seed: int = 0) -> KVCache:
        """Unit-scale random keys and values (timing inputs are never zeros)."""
        gen = torch.Generator(device=self.k.device).manual_seed(seed)
        self.k.uniform_(-1.7, 1.7, generator=gen)
        self.v.uniform_(-1.7, 1.7, generator=gen)
        return self


def rope_frequencies(cfg: ModelConfig, device: torch.device) -> float | torch.Tensor:
    """What the rope op takes: the base theta, or, with Llama 3.1's `rope_scaling`, the fp32 [D/2] inv_freq table
    with its per-frequency factors (long wavelengths / factor, short kept, a smooth blend between), as in HF's
    `_compute_llama3_parameters`."""
    s = cfg.rope_scaling
    if s is None:
        return cfg.rope_theta
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [D/2]
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    out = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)
    return out.to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The model


class Transformer:
    """Weights + config + backend. `with_backend` and `with_layers` share the weights (no copies)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, backend: str = "torch"):
        if not cfg.is_dense:
            raise ValueError(f"{cfg.id}: only dense models are built (MoE / MLA are not)")
        if len(weights.layers) != cfg.num_layers:
            raise ValueError(f"{cfg.id}: {len(weights.layers)} layers of weights for num_layers {cfg.num_layers}")
        self.cfg, self.weights, self.backend, self.ops = cfg, weights, backend, load_ops(backend)
        self.n_q, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps, self.theta = cfg.rms_norm_eps, rope_frequencies(cfg, self.device)

    def with_backend(self, backend: str) -> Transformer:
        return Transformer(self.cfg, self.weights, backend)

    def with_layers(self, n: int) -> Transformer:
        """The first n layers with the same embedding, final norm and LM head (n=0: only those)."""
        return Transformer(with_layers(self.cfg, n), replace(self.weights, layers=self.weights.layers[:n]),
                           self.backend)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.dtype, self.device)

    # --- building blocks, shared by prefill and decode (T tokens flattened); harness.model.tp overrides
    # _embed, _layers, _mlp and _logits to add its collectives ---

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weights.embed)  # [T] -> [T, D]

    def _qkv(self, lw: Layer, x: torch.Tensor, positions: torch.Tensor):
        # x: [T, D] (normed), positions: [T]
        ops, hd = self.ops, self.hd
        qkv = ops.gemm(x, lw.wqkv)  # [T, (Hq + 2·Hkv)·hd]
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        t, nq, nk = x.shape[0], self.n_q * hd, self.n_kv * hd
        q = qkv[:, :nq].view(t, self.n_q, hd)  # [T, Hq, hd]
        k = qkv[:, nq:nq + nk].view(t, self.n_kv, hd)  # [T, Hkv, hd]
        v = qkv[:, nq + nk:].view(t, self.n_kv, hd)  # [T, Hkv, hd]
        if lw.q_norm is not None:  # Qwen3: RMSNorm over head_dim before RoPE
            q = ops.rmsnorm(q, lw.q_norm, self.eps)
            k = ops.rmsnorm(k, lw.k_norm, self.eps)
        q, k = ops.rope(q, k, positions, self.theta)
        return q, k, v

    def _mlp(self, lw: Layer, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        inter = lw.w2.shape[1]
        gu = self.ops.gemm(x, lw.w13)  # [T, 2·I]
        return self.ops.gemm(self.ops.silu_mul(gu[:, :inter], gu[:, inter:]), lw.w2)  # [T, D]

    def _layers(self, h: torch.Tensor, attention):
        """Pre-norm residual stack; the residual add is fused into the next RMSNorm. Returns (h, residual):
        the stream is h + residual (residual None when there are no layers)."""
        ops, eps = self.ops, self.eps
        residual = None
        for i, lw in enumerate(self.weights.layers):
            if residual is None:
                residual, y = h, ops.rmsnorm(h, lw.attn_norm, eps)
            else:
                y, residual = ops.rmsnorm(h, lw.attn_norm, eps, residual)
            h = attention(i, lw, y)
            y, residual = ops.rmsnorm(h, lw.mlp_norm, eps, residual)
            h = self._mlp(lw, y)
        return h, residual

    def _logits(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        # h, residual: [N, D] -> logits [N, V]
        if residual is None:
            y = self.ops.rmsnorm(h, self.weights.norm, self.eps)
        else:
            y, _ = self.ops.rmsnorm(h, self.weights.norm, self.eps, residual)
        return self.ops.gemm(y, self.weights.lm_head)

    # --- prefill and decode ---

    def forward_prefill(self, tokens: torch.Tensor, cache: KVCache | None = None,
                        prompt_lens: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """tokens: [B, S], right-padded when `prompt_lens` [B] is given (causal attention: padding after a
        prompt never reaches it). Writes positions [0, S) to the cache and sets its lengths. Returns the logits
        of each prompt's last token [B, V], or of every position [B, S, V] with `all_logits`."""
        b, s = tokens.shape
        t, hd, ops = b * s, self.hd, self.ops
        positions = torch.arange(s, device=tokens.device, dtype=torch.int32).repeat(b)  # [T]
        h = self._embed(tokens.reshape(t))  # [T, D]

        def attention(i: int, lw: Layer, y: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(lw, y, positions)  # q: [T, Hq, hd], k/v: [T, Hkv, hd]
            q = q.view(b, s, self.n_q, hd).transpose(1, 2)  # [B, Hq, S, hd]
            k = k.view(b, s, self.n_kv, hd).transpose(1, 2)  # [B, Hkv, S, hd]
            v = v.view(b, s, self.n_kv, hd).transpose(1, 2)
            if cache is not None:
                cache.k[i, :, :, :s] = k
                cache.v[i, :, :, :s] = v
            o = ops.attention_prefill(q, k, v, causal=True)  # [B, Hq, S, hd]
            return ops.gemm(o.transpose(1, 2).reshape(t, self.n_q * hd), lw.wo)  # [T, D]

        h, residual = self._layers(h, attention)
        if cache is not None:
            if prompt_lens is None:
                cache.lengths.fill_(s)
            else:
                cache.lengths.copy_(prompt_lens)
        if all_logits:
            return self._logits(h, residual).view(b, s, -1)  # [B, S, V]
        # The LM head only for each prompt's last token: the rows that predict the first new token.
        if prompt_lens is None:
            last = torch.arange(b, device=tokens.device) * s + (s - 1)
        else:
            last = torch.arange(b, device=tokens.device) * s + prompt_lens.to(tokens.device).long() - 1
        return self._logits(h[last], None if residual is None else residual[last])  # [B, V]

    def forward_decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence. tokens: [B] int64; pos: [B] int32, where each goes (= tokens already
        cached). Writes its K/V at pos and attends to [0, pos]. Returns logits [B, V]. No host sync, no
        host-built tensors: capturable in a CUDA graph (does not advance `cache.lengths`; see decode_one_token)."""
        b, hd, ops = tokens.shape[0], self.hd, self.ops
        context_lens = pos + 1  # [B] int32
        slots = (cache.slot_base + pos[:, None].long()).view(-1)  # [B·Hkv] rows of k[i].view(-1, hd)
        h = self._embed(tokens)  # [B, D]

        def attention(i: int, lw: Layer, y: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(lw, y, pos)  # q: [B, Hq, hd], k/v: [B, Hkv, hd]
            k_cache, v_cache = cache.k[i], cache.v[i]  # [B, Hkv, S_max, hd]
            k_cache.view(-1, hd)[slots] = k.reshape(-1, hd)
            v_cache.view(-1, hd)[slots] = v.reshape(-1, hd)
            o = ops.attention_decode(q, k_cache, v_cache, context_lens)  # [B, Hq, hd]
            return ops.gemm(o.reshape(b, self.n_q * hd), lw.wo)  # [B, D]

        h, residual = self._layers(h, attention)
        return self._logits(h, residual)  # [B, V]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, S, V], recomputed from scratch without a cache (the reference that
        decoding with the cache must reproduce)."""
        return self.forward_prefill(tokens, None, all_logits=True)


# ---------------------------------------------------------------------------------------------------------------
# Building


def build_model(cfg: ModelConfig | str, backend: str = "torch", dtype: str | torch.dtype = "bf16",
                device: str | torch.device = "cpu", seed: int = 0, layers: int | None = None,
                tp: int = 1) -> Transformer:
    """A model with seeded random weights. `tp`: one GPU's shard shapes; `layers`: build only that many layers
    (real shapes; the caller scales times to cfg.num_layers)."""
    cfg = load_model_config(cfg) if isinstance(cfg, str) else cfg
    cfg = shard_config(cfg, tp)
    if layers is not None:
        cfg = with_layers(cfg, min(layers, cfg.num_layers))
    return Transformer(cfg, random_weights(cfg, dtype, device, seed), backend)


# ---------------------------------------------------------------------------------------------------------------
# Generation (gpt-fast)


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache,
            prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """tokens: [B, S] (right-padded to S when prompt_lens [B] is given) -> logits of the next token [B, V]."""
    return model.forward_prefill(tokens, cache, prompt_lens)


@torch.no_grad()
def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """token: [B] -> logits [B, V]; the token goes to position cache.lengths, which then advances (on device)."""
    logits = model.forward_decode(token, cache.lengths, cache)
    cache.lengths.add_(1)
    return logits


class DecodeGraph:
    """decode_one_token captured once in a CUDA graph: static token buffer, cache.lengths read and advanced inside
    the graph, static logits out. `graph(token)` returns the logits buffer (overwritten by the next call)."""

    def __init__(self, model: Transformer, cache: KVCache, warmup: int = 2):
        self.token = torch.zeros(cache.batch, dtype=torch.long, device=cache.k.device)
        saved = cache.lengths.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile / autotune and warm the allocator outside the capture
            for _ in range(warmup):
                decode_one_token(model, self.token, cache)
                cache.lengths.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decode_one_token(model, self.token, cache)
        cache.lengths.copy_(saved)  # capture advanced it once

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def decode_n_tokens(model: Transformer, token: torch.Tensor, cache: KVCache, num_new_tokens: int,
                    step=None, return_logits: bool = False):
    """Greedy decoding of num_new_tokens after `token` [B]. step: a DecodeGraph (or any token -> logits
    callable); default eager decode_one_token. Returns new tokens [B, n] (and their logits [B, n, V])."""
    step = step or functools.partial(decode_one_token, model, cache=cache)
    tokens, logits = [], []
    for _ in range(num_new_tokens):
        out = step(token)
        if return_logits:
            logits.append(out.clone())
        token = out.argmax(-1)
        tokens.append(token)
    new = torch.stack(tokens, 1) if tokens else torch.empty(token.shape[0], 0, dtype=torch.long)
    return (new, torch.stack(logits, 1)) if return_logits else new


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             prompt_lens: torch.Tensor | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
    """Greedy generation: prompt [B, S] -> new tokens [B, max_new_tokens]. CUDA graph for the decode step by
    default on a GPU."""
    b, s = prompt.shape
    cache = model.new_cache(b, s + max_new_tokens)
    first = prefill(model, prompt, cache, prompt_lens).argmax(-1)  # [B]
    if max_new_tokens <= 1:
        return first[:, None][:, :max_new_tokens]
    use_graph = model.device.type == "cuda" if cuda_graph is None else cuda_graph
    step = DecodeGraph(model, cache) if use_graph else None
    rest = decode_n_tokens(model, first, cache, max_new_tokens - 1, step)
    return torch.cat([first[:, None], rest], 1)
