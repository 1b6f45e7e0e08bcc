"""The state a forward reads besides the weights: the static KV cache and the RoPE frequencies (with the cos/sin
tables the torch path indexes per step)."""

from __future__ import annotations

import math

import torch
from tokenfleet.dtypes import to_dtype
from tokenfleet.model.spec import ModelConfig

KV_ALIGN = 64  # cache positions are allocated in multiples of this (aligned rows for the attention kernels)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn


def to_cache(t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """t [..., Hkv, hd] (heads second to last) as an e4m3 cache stores it with per-head scales [Hkv]; t itself
    when scale is None (a cache in the activations' dtype)."""
    if scale is None:
        return t
    return (t.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def store_kv(cache: torch.Tensor, where: tuple, t: torch.Tensor, scale: torch.Tensor | None) -> None:
    """cache[where] = t [B, Hkv, hd], quantized when `scale` is given (an e4m3 cache): written as raw bytes then,
    since index_put need not support float8 on every device."""
    if scale is None:
        cache[where] = t
    else:
        cache.view(torch.uint8)[where] = to_cache(t, scale).view(torch.uint8)


class KVCache:
    """Static KV cache for (batch, max context), allocated once: k, v [L, B, Hkv, S_alloc, hd] with S_alloc =
    max_len rounded up to a multiple of KV_ALIGN (an odd length such as context + 1 = 4097 would leave every row of
    the attention's batched matmuls unaligned); `lengths` [B] int32 counts the tokens stored per sequence (the next
    token of sequence b goes to position lengths[b]). Positions past a sequence's length are masked out.

    MLA (DeepSeek-V3): k [L, B, 1, S_alloc, kv_lora_rank + qk_rope_head_dim], the normed latent then the roped
    shared key per token; v is k's first kv_lora_rank channels (a view: the latent is the values).

    dtype fp8: k, v in e4m3 with fp32 scales k_scale, v_scale [L, Hkv] (1.0: vLLM's default when a checkpoint
    ships none; e4m3 spans +-448, far beyond K/V values); a layer stores through `to_cache(t, scale)`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: str | torch.dtype = "bf16",
                 device: str | torch.device = "cpu"):
        dt, dev = to_dtype(dtype), torch.device(device)
        max_len = -(-max_len // KV_ALIGN) * KV_ALIGN
        self.fp8 = dt == FP8
        self.mla = cfg.mla is not None
        if self.mla and self.fp8:
            raise ValueError(f"{cfg.id}: an e4m3 MLA latent cache is not built")
        # MLA: one shared "head" of latent + roped key channels; the values are the latent (a view, no copy).
        heads, width = (1, cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) if self.mla else \
            (cfg.num_kv_heads, cfg.head_dim)
        shape = (cfg.num_layers, batch, heads, max_len, width)
        # Zeros, not empty: masked-out positions are multiplied by 0 in attention, and 0·NaN would be NaN.
        self.k = torch.zeros(shape, dtype=dt, device=dev)
        self.v = self.k[..., :cfg.mla.kv_lora_rank] if self.mla else torch.zeros(shape, dtype=dt, device=dev)
        self.k_scale = torch.ones((cfg.num_layers, cfg.num_kv_heads), device=dev) if self.fp8 else None
        self.v_scale = torch.ones_like(self.k_scale) if self.fp8 else None
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=dev)
        # A decode step writes k[i][b, h, pos[b]] for every (b, h): one index_put per layer and tensor, no host sync
        # (and one torch.compile reinplaces, where a write through a flattened view made it copy the cache).
        self.batch_index = torch.arange(batch, device=dev)[:, None]  # [B, 1]
        self.head_index = torch.arange(heads, device=dev)[None, :]  # [1, Hkv]
        self.batch, self.max_len = batch, max_len

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (0 if self.mla else self.v.nbytes)

    def reset(self) -> None:
        self.lengths.zero_()

    def fill_random(self, seed: int = 0) -> KVCache:
        """Unit-scale random keys and values (timing inputs are never zeros)."""
        gen = torch.Generator(device=self.k.device).manual_seed(seed)
        for t in (self.k,) if self.mla else (self.k, self.v):
            if not self.fp8:
                t.uniform_(-1.7, 1.7, generator=gen)
                continue
            for layer in t:  # one layer at a time in bf16: no full-size temporary
                layer.copy_(torch.empty(layer.shape, dtype=torch.bfloat16, device=t.device).uniform_(
                    -1.7, 1.7, generator=gen))
        return self

    def scales(self, i: int) -> tuple:
        """Layer i's (k_scale, v_scale) for attention_decode, or () unless fp8 (the call takes none then)."""
        return (self.k_scale[i], self.v_scale[i]) if self.fp8 else ()


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


class Rotary:
    """A model's RoPE frequencies: `theta` (the base, or Llama 3.1's fp32 inv_freq table) for kernels that compute
    cos/sin themselves, and cos/sin tables [n, hd] in the model's dtype for the torch path, computed once for
    positions [0, n) and indexed per step (gpt-fast's freqs_cis); a longer cache or prompt grows them (outside any
    CUDA graph: the first call, before capture, sizes them)."""

    def __init__(self, theta: float | torch.Tensor, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.theta, self.head_dim, self.dtype, self.device = theta, head_dim, dtype, device
        self.cos = self.sin = None

    def cos_sin(self, positions: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, hd] at positions [T] (all < n)."""
        if self.cos is None or self.cos.shape[0] < n:
            from tokenfleet.kernels.rope import rope_cos_sin

            size = max(1024, 1 << (n - 1).bit_length())
            table = torch.arange(size, device=self.device)
            self.cos, self.sin = rope_cos_sin(table, self.theta, self.head_dim, self.dtype)
        return self.cos[positions], self.sin[positions]
