"""A decoder-only transformer (Llama, Qwen2, Qwen3 dense; Qwen3-MoE and DeepSeek-V3) over the kernels, gpt-fast style.

One set of weights, four backends (`tokenfleet.model.backends`), each honest about what it is:
- `triton`: the Triton kernels of `kernels/`.
- `torch`: PyTorch eager as a user writes it, in the input dtype: each op's vendor path (`kernels.REGISTRY[op]
  .baseline`: F.linear, F.rms_norm, F.silu(g) * u, SDPA for prefill and for decode with a length mask), RoPE
  cos/sin tables computed once per model and indexed per step (gpt-fast's freqs_cis).
- `compile`: the same torch model under torch.compile (`compile_step`): a layer's prefill and decode blocks and the
  LM head compiled for their shapes (one graph serves every layer: see `Transformer`; a single row's projection on
  the CPU as a reduction, `backends.compiled_gemm`); on a GPU the compiled decode step is then
  captured in a CUDA graph (`DecodeGraph`, or the timing's cuda_graph), as gpt-fast's reduce-overhead mode does.
- `reference`: the kernels' fp32-math references: the correctness oracle, never timed.

QKV is one fused weight and gate/up another (one gemm each instead of three and two). The KV cache
(`tokenfleet.model.cache`) is static, `[L, B, Hkv, S_alloc, D]` with S_alloc the requested length padded to KV_ALIGN,
allocated up front with per-sequence lengths, so a decode step allocates nothing from the host and has no host sync:
it can be captured in a CUDA graph (`DecodeGraph`).

The MoE families (`tokenfleet.model.moe`): a layer's MLP is dense (`w13`, `w2`) or a routed expert layer (`Layer.moe`:
router, experts, DeepSeek's shared experts) as the config places them (`MoE.is_moe_layer`); DeepSeek-V3's attention
is MLA (`Layer.mla`), its cache the compressed latent + rope key per token (`KVCache` with one "head" of
kv_lora_rank + qk_rope_head_dim channels, the values being its first kv_lora_rank), decode in the absorbed form.
`routing_skew` sets the routing condition (None: the router's own choice; per MoE layer for a replayed routing),
`route_log` collects each MoE layer's chosen experts in an eager forward (`expert_counts`). e4m3 experts
(`tokenfleet.model.fp8`) and one GPU's slice of an expert-parallel pool (`ep_slice`: E/ep experts held, the pool's
tokens routed) run the experts in the kernels' form (`moe.kernel_experts`).

Generation, as in gpt-fast: `prefill`, `decode_one_token`, `decode_n_tokens` (and `generate` around them).
Weights are seeded random (`build_model`) or read from a local Hugging Face folder (`tokenfleet.model.hf`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from tokenfleet.dtypes import to_dtype
from tokenfleet.model import moe as E
from tokenfleet.model.backends import (  # noqa: F401  (re-exported: the model's callers name backends through it)
    BACKENDS,
    OPS,
    TIMED_BACKENDS,
    Ops,
    compile_step,
    compiled_gemm,
    compiled_graphs,
    first_call,
    load_ops,
)
from tokenfleet.model.cache import KV_ALIGN, KVCache, Rotary, rope_frequencies, store_kv, to_cache  # noqa: F401  (re-exported)
from tokenfleet.model.spec import (  # noqa: F401  (the counts live on the spec; re-exported for callers)
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

# ---------------------------------------------------------------------------------------------------------------
# Shapes (counts: tokenfleet.model.spec, of the config given: pass a tp shard or a layer subset)


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The per-GPU shapes under tensor parallelism p: heads/p, kv_heads/p (at least 1: replicated when
    kv_heads < p), intermediate/p, vocab/p (vocab-parallel embedding and LM head). Hidden size is unchanged."""
    if tp == 1:
        return cfg
    if not cfg.is_dense:
        raise ValueError(f"{cfg.id}: tensor-parallel shards of MoE / MLA models are not built")
    problem = tp_problem(cfg, tp)
    if problem:
        raise ValueError(problem)
    return cfg.model_copy(update=dict(
        num_heads=cfg.num_heads // tp, num_kv_heads=max(1, cfg.num_kv_heads // tp),
        intermediate_size=math.ceil(cfg.intermediate_size / tp), vocab_size=math.ceil(cfg.vocab_size / tp),
    ))


def with_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    """The first n layers of cfg (an MoE model's dense and MoE layers where the full model has them)."""
    return cfg if n == cfg.num_layers else cfg.model_copy(update=dict(num_layers=n))


# ---------------------------------------------------------------------------------------------------------------
# Weights


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor | None  # [(Hq + 2·Hkv)·hd, D]: q rows, then k, then v (None: MLA)
    bqkv: torch.Tensor | None  # [(Hq + 2·Hkv)·hd] (Qwen2)
    q_norm: torch.Tensor | None  # [hd] (Qwen3)
    k_norm: torch.Tensor | None  # [hd]
    wo: torch.Tensor  # [D, Hq·hd] (MLA: [D, H·v_head_dim])
    mlp_norm: torch.Tensor  # [D]
    w13: torch.Tensor | None  # [2·I, D]: gate rows, then up rows (None: an MoE layer)
    w2: torch.Tensor | None  # [D, I]
    moe: E.MoEWeights | None = None  # the MoE MLP in place of w13/w2
    mla: E.MLAWeights | None = None  # MLA in place of wqkv


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

    def moe_mlp():  # routed experts draw like dense MLPs of moe_intermediate_size; router logits of unit scale
        m = cfg.moe
        ie, shared = m.moe_intermediate_size, m.moe_intermediate_size * m.shared_experts
        sigmoid = m.scoring == "sigmoid"  # DeepSeek-V3: fp32 router and correction bias (as transformers keeps them)
        router = u((m.num_experts, d), d**-0.5)
        return E.MoEWeights(
            router=router.float() if sigmoid else router,
            score_bias=torch.zeros(m.num_experts, device=dev) if sigmoid else None,
            w13=u((m.num_experts, 2 * ie, d), d**-0.5), w2=u((m.num_experts, d, ie), ie**-0.5),
            shared_w13=u((2 * shared, d), d**-0.5) if shared else None,
            shared_w2=u((d, shared), shared**-0.5) if shared else None)

    def mla():
        a = cfg.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        nq = a.q_lora_rank or hq * qk
        return E.MLAWeights(
            wa=u((nq + a.kv_lora_rank + a.qk_rope_head_dim, d), d**-0.5),
            q_norm=norm(a.q_lora_rank) if a.q_lora_rank else None,
            wq_b=u((hq * qk, a.q_lora_rank), a.q_lora_rank**-0.5) if a.q_lora_rank else None,
            kv_norm=norm(a.kv_lora_rank),
            wkv_b=u((hq * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank), a.kv_lora_rank**-0.5))

    def layer(i: int) -> Layer:
        sparse = cfg.moe is not None and cfg.moe.is_moe_layer(i)
        attn_out = hq * (cfg.mla.v_head_dim if cfg.mla else hd)
        return Layer(
            attn_norm=norm(d), wqkv=None if cfg.mla else u((qkv, d), d**-0.5),
            bqkv=u(qkv, 0.1) if cfg.attention_bias and not cfg.mla else None,
            q_norm=norm(hd) if cfg.qk_norm else None, k_norm=norm(hd) if cfg.qk_norm else None,
            wo=u((d, attn_out), attn_out**-0.5), mlp_norm=norm(d),
            w13=None if sparse else u((2 * inter, d), d**-0.5), w2=None if sparse else u((d, inter), inter**-0.5),
            moe=moe_mlp() if sparse else None, mla=mla() if cfg.mla else None,
        )

    layers = [layer(i) for i in range(cfg.num_layers)]
    embed = u((cfg.vocab_size, d), 1.0)
    lm_head = embed if cfg.tie_word_embeddings else u((cfg.vocab_size, d), d**-0.5)
    return Weights(embed=embed, layers=layers, norm=norm(d), lm_head=lm_head)


# ---------------------------------------------------------------------------------------------------------------
# The model


class Transformer:
    """Weights + config + backend. `with_backend` and `with_layers` share the weights (no copies).

    A forward is the embedding, the first layer's input norm, one block per layer, and the LM head. A layer's block
    ends with the norm of the next layer's input (the final norm after the last layer), its residual add fused in,
    so every layer is one block of one shape: under `compile` Inductor compiles one block per shape and every layer
    runs it (compile time does not grow with depth: a whole qwen3-0.6b decode step took 200 s to compile on a 2-core
    CPU). The embedding lookup is a single vendor op and runs eager; the LM head is compiled by itself (`_head`)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, backend: str = "torch", rotary: Rotary | None = None,
                 kv_dtype: str | torch.dtype | None = None, routing_skew: torch.Tensor | None = None):
        if len(weights.layers) != cfg.num_layers:
            raise ValueError(f"{cfg.id}: {len(weights.layers)} layers of weights for num_layers {cfg.num_layers}")
        self.cfg, self.weights, self.backend, self.ops = cfg, weights, backend, load_ops(backend)
        self.n_q, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        rot_dim = cfg.mla.qk_rope_head_dim if cfg.mla else self.hd
        self.rotary = rotary or Rotary(rope_frequencies(cfg, self.device), rot_dim, self.dtype, self.device)
        self.kv_dtype = None if kv_dtype is None else to_dtype(kv_dtype)  # None: the activations' dtype
        if cfg.mla and self.kv_dtype not in (None, self.dtype):
            raise ValueError(f"{cfg.id}: the MLA latent cache is built in the activations' dtype only")
        self.routing_skew = routing_skew  # [E] bias on the routers' choice scores (moe.routing_skew), or None
        self.route_log: list | None = None  # set to a list: each MoE layer appends its chosen experts (eager only)
        self.expert_inputs: list | None = None  # set to a list: each MoE layer appends its expert layer's inputs
        mw = next((lw.moe for lw in weights.layers if lw.moe is not None), None)
        # the expert layer this backend runs for these weights, picked here (outside any trace): e4m3 experts and EP
        # slices in the kernels' form (moe.kernel_experts)
        self.experts = None
        if mw is not None:
            widths = (*mw.w13.shape[1:], *mw.w2.shape[1:])
            self.experts = E.kernel_experts(backend, mw.w13_scale is not None, self.dtype, self.device, widths) \
                if mw.kernel_form else self.ops.experts(self.dtype, self.device, widths)
        self._prefill_block, self._decode_block = self._prefill_layer, self._decode_layer
        self._head = self.ops.gemm
        if self.ops.compiled:
            self._prefill_block = compile_step(self._prefill_layer, self.device)
            self._decode_block = compile_step(self._decode_layer, self.device)
            self._head = compile_step(self.ops.gemm, self.device)

    def with_backend(self, backend: str) -> Transformer:
        return Transformer(self.cfg, self.weights, backend, self.rotary, self.kv_dtype, self.routing_skew)

    def with_layers(self, n: int) -> Transformer:
        """The first n layers with the same embedding, final norm and LM head (n=0: only those)."""
        return Transformer(with_layers(self.cfg, n), replace(self.weights, layers=self.weights.layers[:n]),
                           self.backend, self.rotary, self.kv_dtype, self.routing_skew)

    def with_routing(self, skew: torch.Tensor | None) -> Transformer:
        """The same model routing with `skew` added to its routers' choice scores (None: their own choice): [E] for
        every MoE layer, or [MoE layers built, E], one row per MoE layer in order (a replayed routing: kept with the
        layer's MoEWeights, which share the weight tensors)."""
        weights = self.weights
        if skew is not None and skew.dim() == 2:
            if skew.shape[0] != self.cfg.num_moe_layers:
                raise ValueError(f"{self.cfg.id}: {skew.shape[0]} per-layer skews for {self.cfg.num_moe_layers} MoE "
                                 "layers")
            rows = iter(skew)
            weights = replace(weights, layers=[replace(lw, moe=replace(lw.moe, skew=next(rows)))
                                               if lw.moe is not None else lw for lw in weights.layers])
            skew = None
        return Transformer(self.cfg, weights, self.backend, self.rotary, self.kv_dtype, skew)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch, max_len, self.kv_dtype or self.dtype, self.device)

    def _linear(self, x: torch.Tensor, w) -> torch.Tensor:
        # A layer projection: a weight tensor through the backend's gemm, or a quantized weight (tokenfleet.model.fp8)
        # that multiplies itself on this backend.
        return self.ops.gemm(x, w) if isinstance(w, torch.Tensor) else w.linear(x, self.backend)

    # --- building blocks, shared by prefill and decode (T tokens flattened); tokenfleet.model.tp overrides _embed,
    # _reduce and _logits to add its collectives ---

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weights.embed)  # [T] -> [T, D]

    def _reduce(self, h: torch.Tensor) -> torch.Tensor:
        """The output of a row-parallel projection (attention's O, the MLP's down): a whole sum here; a sum of the
        ranks' partial sums under tensor parallelism."""
        return h

    def _logits(self, y: torch.Tensor) -> torch.Tensor:
        return self._head(y, self.weights.lm_head)  # final-normed [N, D] -> [N, V]

    def _qkv(self, lw: Layer, x: torch.Tensor, rot: tuple):
        # x: [T, D] (normed), rot: the rope op's angles for the T tokens (ops.rotary)
        ops, hd = self.ops, self.hd
        qkv = self._linear(x, lw.wqkv)  # [T, (Hq + 2·Hkv)·hd]
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        t, nq, nk = x.shape[0], self.n_q * hd, self.n_kv * hd
        q = qkv[:, :nq].view(t, self.n_q, hd)  # [T, Hq, hd]
        k = qkv[:, nq:nq + nk].view(t, self.n_kv, hd)  # [T, Hkv, hd]
        v = qkv[:, nq + nk:].view(t, self.n_kv, hd)  # [T, Hkv, hd]
        if lw.q_norm is not None:  # Qwen3: RMSNorm over head_dim before RoPE
            q = ops.rmsnorm(q, lw.q_norm, self.eps)
            k = ops.rmsnorm(k, lw.k_norm, self.eps)
        q, k = ops.rope(q, k, *rot)
        return q, k, v

    def _dense_mlp(self, y: torch.Tensor, w13, w2) -> torch.Tensor:
        inter = w2.shape[1]
        gu = self._linear(y, w13)  # [T, 2·I]
        return self._linear(self.ops.silu_mul(gu[:, :inter], gu[:, inter:]), w2)  # [T, D]

    def _moe_mlp(self, mw: E.MoEWeights, y: torch.Tensor) -> torch.Tensor:
        """An MoE layer's MLP on the normed y [T, D]: route, the routed experts, + the shared experts."""
        m = self.cfg.moe
        skew = self.routing_skew if mw.skew is None else mw.skew  # the model's, or this layer's own (replayed)
        t, ep = y.shape[0], E.ep_degree(mw)
        y_all = E.pool_tokens(y, ep) if ep > 1 else y  # an EP slice routes the pool's tokens (moe.pool_tokens)
        if m.scoring == "softmax":
            weights, ids = self.ops.route_softmax(self.ops.gemm(y_all, mw.router), m.experts_per_token,
                                                  m.norm_topk_prob, skew)
        else:
            weights, ids = self.ops.route_sigmoid(self.ops.gemm(y_all.float(), mw.router), m.experts_per_token,
                                                  m.norm_topk_prob, mw.score_bias, m.n_group, m.topk_group,
                                                  m.routed_scaling_factor, skew)
        if self.route_log is not None:
            self.route_log.append(ids)
        if self.expert_inputs is not None:
            self.expert_inputs.append((y_all, ids, weights, mw))
        if mw.kernel_form:
            out = E.run_kernel_experts(self.experts, y_all, mw, ids, weights)[:t]  # this GPU's tokens' rows
        else:
            out = self.experts(y, mw.w13, mw.w2, ids, weights)
        if mw.shared_w13 is not None:
            out = out + self._dense_mlp(y, mw.shared_w13, mw.shared_w2)
        return out

    def _mlp_block(self, lw: Layer, next_norm: torch.Tensor, h: torch.Tensor, residual: torch.Tensor):
        """The rest of a layer after attention's output projection h [T, D]: add + norm, gate/up, SiLU·mul, down
        (or the MoE MLP), add + the next norm. Returns (y, residual): the next layer's normed input and the stream."""
        ops, eps = self.ops, self.eps
        y, residual = ops.rmsnorm(h, lw.mlp_norm, eps, residual)
        h = self._moe_mlp(lw.moe, y) if lw.moe is not None else self._dense_mlp(y, lw.w13, lw.w2)
        return ops.rmsnorm(self._reduce(h), next_norm, eps, residual)

    # --- MLA (DeepSeek-V3) ---

    def _mla_qkv(self, a: E.MLAWeights, x: torch.Tensor, rot: tuple):
        """x [T, D] (normed) -> q_nope [T, H, nope], q_rope [T, H, rope] (roped), the normed latent c [T, r] and
        the roped shared key k_rope [T, 1, rope]."""
        ops, m, t = self.ops, self.cfg.mla, x.shape[0]
        r, rope, nope = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim
        qa = self._linear(x, a.wa)  # [T, Q + r + rope]: the q down- (or full) projection and kv_a in one gemm
        nq = qa.shape[1] - r - rope
        q = qa[:, :nq]
        if a.wq_b is not None:
            q = self._linear(ops.rmsnorm(q.contiguous(), a.q_norm, self.eps), a.wq_b)
        q = q.reshape(t, self.n_q, nope + rope)
        c = ops.rmsnorm(qa[:, nq:nq + r].contiguous(), a.kv_norm, self.eps)
        q_rope, k_rope = ops.rope(q[..., nope:].contiguous(), qa[:, nq + r:].reshape(t, 1, rope), *rot)
        return q[..., :nope], q_rope, c, k_rope

    def _mla_prefill(self, lw: Layer, y: torch.Tensor, k_cache: torch.Tensor | None, rot: tuple, b: int):
        """MLA over a prompt as ordinary attention after up-projecting keys and values; the latent and the roped
        key go to the cache [B, 1, S_alloc, r + rope]. Returns the heads' output [T, H·v]."""
        m, t, h = self.cfg.mla, y.shape[0], self.n_q
        nope, s = m.qk_nope_head_dim, t // b
        q_nope, q_rope, c, k_rope = self._mla_qkv(lw.mla, y, rot)
        if k_cache is not None:
            k_cache[:, 0, :s] = torch.cat([c, k_rope[:, 0]], -1).view(b, s, -1)
        kv = self._linear(c, lw.mla.wkv_b).view(t, h, nope + m.v_head_dim)  # per head: nope key, then value
        k = torch.cat([kv[..., :nope], k_rope.expand(t, h, m.qk_rope_head_dim)], -1)
        q = torch.cat([q_nope, q_rope], -1)

        def heads(x):  # [T, H, d] -> [B, H, S, d]
            return x.reshape(b, s, h, x.shape[-1]).transpose(1, 2)

        o = self.ops.mla_prefill(heads(q), heads(k), heads(kv[..., nope:]), E.mla_scale(q.shape[-1]))
        return o.transpose(1, 2).reshape(t, h * m.v_head_dim)

    def _stack(self, h: torch.Tensor, block) -> torch.Tensor:
        """Embeddings h [T, D] -> the final-normed stream [T, D]: block(i, lw, next_norm, y, residual) per
        layer."""
        layers, final = self.weights.layers, self.weights.norm
        y, residual = self.ops.rmsnorm(h, layers[0].attn_norm if layers else final, self.eps), h
        next_norms = [lw.attn_norm for lw in layers[1:]] + [final]
        for i, lw in enumerate(layers):
            y, residual = block(i, lw, next_norms[i], y, residual)
        return y

    # --- prefill and decode ---

    def forward_prefill(self, tokens: torch.Tensor, cache: KVCache | None = None,
                        prompt_lens: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        """tokens: [B, S], right-padded when `prompt_lens` [B] is given (causal attention: padding after a
        prompt never reaches it). Writes positions [0, S) to the cache and sets its lengths. Returns the logits
        of each prompt's last token [B, V], or of every position [B, S, V] with `all_logits`."""
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device, dtype=torch.int32).repeat(b)  # [T]
        rot = self.ops.rotary(self.rotary, positions, s)
        h = self._embed(tokens.reshape(b * s))  # [T, D]

        def block(i, lw, next_norm, y, residual):
            kv = (None, None, ()) if cache is None else (cache.k[i], cache.v[i], cache.scales(i))
            return self._prefill_block(lw, next_norm, y, residual, *kv, rot, b)

        y = self._stack(h, block)
        if cache is not None:
            if prompt_lens is None:
                cache.lengths.fill_(s)
            else:
                cache.lengths.copy_(prompt_lens)
        if all_logits:
            return self._logits(y).view(b, s, -1)  # [B, S, V]
        # The LM head only for each prompt's last token: the rows that predict the first new token.
        last = s - 1 if prompt_lens is None else prompt_lens.to(tokens.device).long() - 1
        return self._logits(y[torch.arange(b, device=tokens.device) * s + last])  # [B, V]

    def _prefill_layer(self, lw: Layer, next_norm: torch.Tensor, y: torch.Tensor, residual: torch.Tensor,
                       k_cache: torch.Tensor | None, v_cache: torch.Tensor | None, kv_scales: tuple, rot: tuple,
                       b: int):
        # y, residual: [T, D], T = B·S; k_cache/v_cache: this layer's [B, Hkv, S_alloc, hd], or None; kv_scales:
        # their e4m3 scales (k [Hkv], v [Hkv]), () unless the cache is fp8
        if lw.mla is not None:
            h = self._reduce(self._linear(self._mla_prefill(lw, y, k_cache, rot, b), lw.wo))  # [T, D]
            return self._mlp_block(lw, next_norm, h, residual)
        t, hd = y.shape[0], self.hd
        s = t // b
        q, k, v = self._qkv(lw, y, rot)  # q: [T, Hq, hd], k/v: [T, Hkv, hd]
        q = q.view(b, s, self.n_q, hd).transpose(1, 2)  # [B, Hq, S, hd]
        k = k.view(b, s, self.n_kv, hd).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(b, s, self.n_kv, hd).transpose(1, 2)
        if k_cache is not None:
            ks, vs = kv_scales or (None, None)
            k_cache[:, :, :s] = to_cache(k.transpose(1, 2), ks).transpose(1, 2)
            v_cache[:, :, :s] = to_cache(v.transpose(1, 2), vs).transpose(1, 2)
        o = self.ops.attention_prefill(q, k, v, causal=True)  # [B, Hq, S, hd]
        h = self._reduce(self._linear(o.transpose(1, 2).reshape(t, self.n_q * hd), lw.wo))  # [T, D]
        return self._mlp_block(lw, next_norm, h, residual)

    def forward_decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per sequence. tokens: [B] int64; pos: [B] int32, where each goes (= tokens already
        cached). Writes its K/V at pos and attends to [0, pos]. Returns logits [B, V]. No host sync, no
        host-built tensors: capturable in a CUDA graph (does not advance `cache.lengths`; see decode_one_token)."""
        rot = self.ops.rotary(self.rotary, pos, cache.max_len)
        where = (cache.batch_index, cache.head_index, pos.long()[:, None])  # k[i][b, h, pos[b]], [B, Hkv]
        context_lens = pos + 1  # [B] int32
        h = self._embed(tokens)  # [B, D]

        def block(i, lw, next_norm, y, residual):
            k, v = cache.k[i], cache.v[i]
            if self.ops.compiled:  # the cache length is dynamic: one compiled decode block per batch for every
                # context, as gpt-fast's one max-length cache gives one graph for every position (maybe_: a length
                # equal to another size stays static rather than failing)
                torch._dynamo.maybe_mark_dynamic(k, 2)
                torch._dynamo.maybe_mark_dynamic(v, 2)
            return self._decode_block(lw, next_norm, y, residual, k, v, cache.scales(i), rot, where, context_lens)

        return self._logits(self._stack(h, block))  # [B, V]

    def _decode_layer(self, lw: Layer, next_norm: torch.Tensor, y: torch.Tensor, residual: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, kv_scales: tuple, rot: tuple, where: tuple,
                      context_lens: torch.Tensor):
        # y, residual: [B, D]; k_cache/v_cache: this layer's [B, Hkv, S_alloc, hd]; kv_scales as in _prefill_layer
        if lw.mla is not None:  # the latent + roped key at pos, then absorbed attention over the latent cache
            q_nope, q_rope, c, k_rope = self._mla_qkv(lw.mla, y, rot)
            store_kv(k_cache, where, torch.cat([c, k_rope[:, 0]], -1)[:, None], None)
            o = self.ops.mla_decode(q_nope, q_rope, k_cache, context_lens, lw.mla.wkv_b,
                                    E.mla_scale(q_nope.shape[-1] + q_rope.shape[-1]))  # [B, H, v]
            h = self._reduce(self._linear(o.reshape(y.shape[0], -1), lw.wo))
            return self._mlp_block(lw, next_norm, h, residual)
        q, k, v = self._qkv(lw, y, rot)  # q: [B, Hq, hd], k/v: [B, Hkv, hd]
        ks, vs = kv_scales or (None, None)
        store_kv(k_cache, where, k, ks)
        store_kv(v_cache, where, v, vs)
        o = self.ops.attention_decode(q, k_cache, v_cache, context_lens, *kv_scales)  # [B, Hq, hd]
        h = self._reduce(self._linear(o.reshape(y.shape[0], self.n_q * self.hd), lw.wo))  # [B, D]
        return self._mlp_block(lw, next_norm, h, residual)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every position [B, S, V], recomputed from scratch without a cache (the reference that
        decoding with the cache must reproduce)."""
        return self.forward_prefill(tokens, None, all_logits=True)


def kv_positions_read(backend: str, context: int) -> int:
    """KV positions one decode step reads per sequence at `context` tokens cached: Triton's decode attention reads
    each sequence's own context + 1 (the new token's included); the torch path — SDPA with a length mask, eager or
    compiled — reads the whole allocated cache, context + 1 padded to KV_ALIGN (KVCache's S_alloc), masked or not."""
    need = context + 1
    return need if backend == "triton" else -(-need // KV_ALIGN) * KV_ALIGN


def padded_kv_bytes(cfg: ModelConfig, batch: int, context: int, kv_bytes: int, backend: str) -> float:
    """Bytes a decode step's attention reads beyond the context + 1 positions `decode_bytes` counts: the cache's
    padding where the backend reads it (`kv_positions_read`), `kv_bytes` per element."""
    return batch * (kv_positions_read(backend, context) - (context + 1)) * cfg.kv_bytes_per_token(kv_bytes)


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


def ep_slice(model: Transformer, ep: int, rank: int = 0) -> Transformer:
    """The model as one GPU of an expert-parallel pool of `ep` GPUs with data-parallel attention: every layer whole
    but the routed experts, of which it holds rank `rank`'s E/ep (`moe.slice_experts`); its MoE layers route this
    GPU's tokens and the pool's other ep-1 GPUs' (`moe.pool_tokens`) and compute the pairs routed to its experts
    (the dispatch and combine, all-to-all, are not in it). ep 1: the model itself."""
    if ep == 1:
        return model
    layers = [replace(lw, moe=E.slice_experts(lw.moe, ep, rank)) if lw.moe is not None else lw
              for lw in model.weights.layers]
    return Transformer(model.cfg, replace(model.weights, layers=layers), model.backend, model.rotary,
                       model.kv_dtype, model.routing_skew)


@torch.no_grad()
def expert_counts(model: Transformer, run) -> torch.Tensor:
    """Tokens routed to each expert, [MoE layers, E] int64 on the host, in `run(m)` (a forward of m): m is the model
    on its own backend, eager (the torch backend in place of `compile`), with its routing condition."""
    m = model.with_backend("torch") if model.ops.compiled else model.with_backend(model.backend)
    m.route_log = []
    run(m)
    e = model.cfg.moe.num_experts
    return torch.stack([torch.bincount(ids.reshape(-1), minlength=e) for ids in m.route_log]).cpu()


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
        stream = torch.cuda.current_stream()
        stream.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = decode_one_token(model, self.token, cache)
        except BaseException:
            torch.cuda.set_stream(stream)  # an invalidated capture raises before torch.cuda.graph restores it
            raise
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
