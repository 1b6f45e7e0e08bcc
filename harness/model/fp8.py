"""FP8 serving of the decoder: e4m3 layer projections (QKV, O, gate/up, down), bf16 everywhere else (embedding,
norms, RoPE, attention math, LM head, as FP8 checkpoints of Llama 3.1 and DeepSeek-V3 keep them), and the KV
cache in bf16 or e4m3 (`kv_dtype`).

Scales: `tensor` quantizes each weight with one amax/448 scale and the activations with a dynamic per-tensor
scale computed on every call (vLLM's online `--quantization fp8`); `block` is DeepSeek-V3's layout (weights per
128x128 block, activations per token per 128 channels, inside `kernels.gemm_fp8`). torch._scaled_mm on the CPU
takes scalar scales only, so the CPU runs `tensor`.

A quantized weight is an `Fp8Weight` in place of the tensor in `decoder.Layer`: the decoder calls its `linear`.

MoE models (`qwen3_moe`, `deepseek_v3`): the routed experts go to e4m3 with DeepSeek-V3's 128x128 block scales
(`quantize_experts`, one expert at a time; `MoEWeights.w13_scale` / `w2_scale`), the layout DeepSeek-V3's FP8
checkpoint and `kernels.moe` use; everything else stays bf16: MLA, attention, the dense layers, the shared experts,
routers, embedding and head. The experts then run in the kernels' form on every backend (`moe.kernel_experts`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tokenfleet.kernels import REGISTRY
from tokenfleet.kernels.gemm_fp8 import FP8, SCALE_BLOCK, quantize_weight_fp8
from tokenfleet.model import decoder as M
from tokenfleet.model import moe as E
from tokenfleet.model.spec import ModelConfig

LINEARS = ("wqkv", "wo", "w13", "w2")  # the projections that go to e4m3
LAYOUTS = ("tensor", "block")
# Relative L2 error of the fp8 model's next-token logits (torch backend, decoding with its e4m3 KV cache) against
# the bf16 model's (full recompute), seeded random weights at real shapes, 2 prompts of 8 tokens + 1 decode step.
# Measured on the CPU (torch 2.13, seed 0, e4m3 KV): `tensor` scales: tiny 0.058, tiny-qwen3 0.064, qwen3-0.6b
# 4 layers 0.087 and all 28 layers 0.145, llama-3.1-8b 2 layers 0.067; `block` (ref backend): qwen3-0.6b 8 layers
# 0.115. e4m3 keeps 3 mantissa bits (3.6% rms rounding per operand); the error compounds with depth, more slowly
# than sqrt(layers). A broken scale or cache path gives errors near 1.
TOLERANCE = 0.3
# e4m3 routed experts (block scales; bf16 elsewhere) against the bf16 model's fp32 reference, the same check:
# measured on the CPU (reference backend, 2 prompts of 8 tokens + 1 decode step, the largest over model seeds 0, 1
# and 2, 2026-12-04): MOE_MEASURED below (tiny-qwen3-moe 0.027-0.030, tiny-deepseek-v3 0.045-0.059; at real
# shapes, qwen3-30b-a3b's first 2 layers 0.019-0.031: below the tiny models' largest). The check
# allows MOE_TOLERANCE_FACTOR times the largest: e4m3 rounding of the experts alone, plus the experts a near-tied
# router then picks otherwise in later layers (which moved 16-bit MoE checks by 2-4x: parts/model.MOE_TOLERANCE).
MOE_MEASURED = {"tiny-qwen3-moe": 0.0299, "tiny-deepseek-v3": 0.0590}
MOE_TOLERANCE_FACTOR = 3.0
MOE_TOLERANCE = MOE_TOLERANCE_FACTOR * max(MOE_MEASURED.values())
EXPERT_LAYOUT = "block"  # e4m3 experts: DeepSeek-V3's 128x128 block scales only


@dataclass
class Fp8Weight:
    """An e4m3 weight [N, K] with its scale (a scalar, or [ceil(N/128), ceil(K/128)] per block)."""

    q: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, w: torch.Tensor, layout: str) -> Fp8Weight:
        return cls(*quantize_weight_fp8(w, layout))

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def linear(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        # x: [T, K] -> [T, N] in x.dtype, on `backend` (triton: our kernels; torch and compile: torch._scaled_mm;
        # reference: fp32).
        op = REGISTRY["gemm_fp8"]
        fn = {"triton": op.triton, "torch": op.baseline, "compile": op.baseline, "reference": op.reference}[backend]
        # Dynamic per-tensor activation scale: one reduction on the device, no host sync (CUDA-graph safe).
        xs = None if self.scale.dim() == 2 else (x.abs().amax().float() / 448.0).clamp_min(1e-12)
        return fn(x, self.q, self.scale, xs).to(x.dtype)


def _per_expert(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> e4m3 [E, N, K] and fp32 block scales [E, ceil(N/128), ceil(K/128)], one expert at a time."""
    e, n, k = w.shape
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    sc = torch.empty((e, -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK)), dtype=torch.float32, device=w.device)
    for x in range(e):
        q[x], sc[x] = quantize_weight_fp8(w[x], EXPERT_LAYOUT)
    return q, sc


def quantize_experts(mw: E.MoEWeights) -> E.MoEWeights:
    """An MoE MLP with its routed experts in e4m3 (128x128 block scales); router and shared experts as they were."""
    (w13, s13), (w2, s2) = _per_expert(mw.w13), _per_expert(mw.w2)
    return replace(mw, w13=w13, w2=w2, w13_scale=s13, w2_scale=s2)


def quantize(model: M.Transformer, layout: str = "tensor", kv_dtype: str = "bf16") -> M.Transformer:
    """The same model with e4m3 layer projections (the bf16 ones are dropped) and its cache in `kv_dtype`; an MoE
    model's routed experts instead (`layout` must be `block`; module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown fp8 scale layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if model.cfg.moe is not None:
        if layout != EXPERT_LAYOUT:
            raise ValueError(f"{model.cfg.id}: e4m3 MoE experts take DeepSeek-V3's 128x128 block scales "
                             f"(scale layout {EXPERT_LAYOUT!r}), not {layout!r}")
        layers = []
        for lw in model.weights.layers:
            layers.append(replace(lw, moe=quantize_experts(lw.moe)) if lw.moe is not None else lw)
            if lw.moe is not None:  # free each bf16 expert tensor as soon as it is quantized
                lw.moe = None
        return M.Transformer(model.cfg, replace(model.weights, layers=layers), model.backend, model.rotary,
                             "fp8" if kv_dtype == "fp8" else None, model.routing_skew)
    layers = []
    for lw in model.weights.layers:
        layers.append(replace(lw, **{n: Fp8Weight.quantize(getattr(lw, n), layout) for n in LINEARS}))
        for n in LINEARS:  # free each bf16 projection as soon as it is quantized
            setattr(lw, n, None)
    # kv_dtype bf16 means the activations' dtype (fp32 when the model was built in fp32 for the interpreter).
    return M.Transformer(model.cfg, replace(model.weights, layers=layers), model.backend, model.rotary,
                         "fp8" if kv_dtype == "fp8" else None)


def build_model(cfg: ModelConfig | str, backend: str = "torch", device: str | torch.device = "cpu", seed: int = 0,
                layers: int | None = None, layout: str = "tensor", kv_dtype: str = "bf16",
                act_dtype: str = "bf16") -> M.Transformer:
    """`decoder.build_model` in `act_dtype` (bf16; fp32 lets the Triton path run under the interpreter), then
    quantized: same seed, same weights as the bf16 model before rounding to e4m3."""
    return quantize(M.build_model(cfg, backend, act_dtype, device, seed, layers), layout, kv_dtype)


def _linear_params(cfg: ModelConfig) -> int:
    """Parameters of one layer that are e4m3 (QKV without its bias, O, gate/up, down)."""
    d, hd, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    return (hq + 2 * hkv) * hd * d + hq * hd * d + 3 * d * inter


def _expert_saving(cfg: ModelConfig, tokens: int, experts_touched: float | None) -> float:
    """Bytes e4m3 experts save over bf16 ones in one forward of `tokens` tokens: one byte per parameter of each
    expert touched (summed over the MoE layers; None: the uniform expectation), less its fp32 block scales."""
    if experts_touched is None:
        experts_touched = cfg.num_moe_layers * cfg.expected_experts_touched(tokens)
    d, i = cfg.hidden_size, cfg.moe.moe_intermediate_size

    def blocks(n):
        return -(-n // SCALE_BLOCK)

    scales = 4 * (blocks(2 * i) * blocks(d) + blocks(d) * blocks(i))
    return experts_touched * (cfg.expert_params - scales)


def prefill_bytes(cfg: ModelConfig, batch: int, prompt_len: int, kv_bytes: int,
                  experts_touched: float | None = None) -> float:
    """decoder.prefill_bytes with 1-byte layer projections (MoE: 1-byte routed experts + their block scales, the
    experts touched) and `kv_bytes` KV elements (bf16 elsewhere)."""
    kv_diff = batch * prompt_len * (cfg.kv_bytes_per_token(2) - cfg.kv_bytes_per_token(kv_bytes))
    if cfg.moe is not None:
        return M.prefill_bytes(cfg, batch, prompt_len, 2, experts_touched) \
            - _expert_saving(cfg, batch * prompt_len, experts_touched) - kv_diff
    return M.prefill_bytes(cfg, batch, prompt_len, 2) - cfg.num_layers * _linear_params(cfg) - kv_diff


def decode_bytes(cfg: ModelConfig, batch: int, context: int, kv_bytes: int,
                 experts_touched: float | None = None) -> float:
    """decoder.decode_bytes with 1-byte layer projections (MoE: 1-byte routed experts + their block scales, the
    experts touched) and `kv_bytes` KV elements (bf16 elsewhere)."""
    kv_diff = batch * (context + 2) * (cfg.kv_bytes_per_token(2) - cfg.kv_bytes_per_token(kv_bytes))
    if cfg.moe is not None:
        return M.decode_bytes(cfg, batch, context, 2, experts_touched) - _expert_saving(cfg, batch, experts_touched) \
            - kv_diff
    return M.decode_bytes(cfg, batch, context, 2) - cfg.num_layers * _linear_params(cfg) - kv_diff


def weight_bytes_per_layer(cfg: ModelConfig) -> float:
    """Bytes of one quantized layer (e4m3 projections, bf16 norms/bias), for sizing how many layers fit."""
    return M.layer_params(cfg) * 2 - _linear_params(cfg)
