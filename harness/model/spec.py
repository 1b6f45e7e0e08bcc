"""Model architectures as validated data (`configs/models/*.yaml`): shapes from the published config.json, and
the ONE home of parameter, FLOP and byte counts: the decoder (`tokenfleet.model.decoder` re-exports the dense-decoder
counts below), the measured points (`tokenfleet.measure.parts.model`) and the capacity model
(`tokenfleet.capacity.serving`) all count through this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tokenfleet.config import Strict, load_all, load_named


class MoE(Strict):
    """A mixture-of-experts MLP and its router, with config.json's names in the descriptions (Qwen3-MoE,
    DeepSeek-V3). The routing defaults are transformers' Qwen3MoeConfig / DeepseekV3Config defaults except
    `norm_topk_prob`, True as every released Qwen3-MoE and DeepSeek-V3 config.json sets it."""

    num_experts: int = Field(gt=0, description="routed experts per MoE layer (num_experts / n_routed_experts)")
    experts_per_token: int = Field(gt=0, description="num_experts_per_tok")
    moe_intermediate_size: int = Field(gt=0)
    shared_experts: int = Field(0, ge=0, description="n_shared_experts: one MLP of moe_intermediate_size x this")
    dense_layers: int = Field(0, ge=0, description="first_k_dense_replace: the first k layers use a dense MLP of "
                                                  "intermediate_size")
    sparse_step: int = Field(1, gt=0, description="decoder_sparse_step: layer i is MoE when (i+1) % step == 0")
    mlp_only_layers: list[int] = Field(default_factory=list, description="mlp_only_layers: dense-MLP layers")
    scoring: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="softmax over the router logits (Qwen3-MoE) or sigmoid per expert (DeepSeek-V3, with "
                               "its e_score_correction_bias added for the choice only)")
    norm_topk_prob: bool = Field(True, description="renormalise the k chosen weights to sum to 1")
    n_group: int = Field(1, gt=0, description="DeepSeek-V3 group-limited routing: expert groups")
    topk_group: int = Field(1, gt=0, description="groups a token may route to (by the sum of each group's top 2)")
    routed_scaling_factor: float = Field(1.0, gt=0, description="the routed experts' weights are scaled by this")

    @model_validator(mode="after")
    def _routing(self) -> MoE:
        if self.experts_per_token > self.num_experts or self.num_experts % self.n_group \
                or self.topk_group > self.n_group:
            raise ValueError(f"routing: top-{self.experts_per_token} of {self.num_experts} experts in "
                             f"{self.topk_group} of {self.n_group} groups is not possible")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise ValueError("routing: group-limited routing scores each group by its top 2: >= 2 experts a group")
        return self

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has the MoE MLP (transformers' rule: Qwen3-MoE's mlp_only_layers and sparse step,
        DeepSeek-V3's first_k_dense_replace)."""
        return i >= self.dense_layers and i not in self.mlp_only_layers and (i + 1) % self.sparse_step == 0


class MLA(Strict):
    q_lora_rank: int | None = Field(None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    rope_interleave: bool = Field(True, description="rope on interleaved pairs (DeepSeek-V3's config.json and "
                                                    "transformers' DeepseekV3Config default)")


class RopeScaling(Strict):
    """Llama 3.1's RoPE scaling (config.json `rope_scaling`, rope_type llama3): long wavelengths divided by
    `factor`, short ones kept, a smooth blend between; the cost is the same as plain RoPE."""

    rope_type: Literal["llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)


class ModelConfig(Strict):
    id: str
    hf_repo: str
    family: str = Field(description="llama | qwen2 | qwen3 | qwen3_moe | deepseek_v3 | tiny")
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    rope_theta: float = Field(gt=0)
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = Field(gt=0)
    tie_word_embeddings: bool = False
    qk_norm: bool = Field(False, description="Qwen3: RMSNorm over head_dim on q and k before RoPE")
    attention_bias: bool = Field(False, description="Qwen2/2.5: bias on the q, k, v projections")
    max_position_embeddings: int = Field(gt=0)
    moe: MoE | None = None
    mla: MLA | None = None
    params_published: str | None = None
    params_exact: int | None = Field(None, description="exact parameter count from an independent source, for checks")
    params_active_exact: int | None = Field(None, description="exact activated parameters per token (MoE), for checks")
    native_dtype: str | None = Field(None, description="dtype the published weights ship in (e.g. fp8 for DeepSeek-V3)")
    sources: list[str] = Field(min_length=1)
    discrepancies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def is_dense(self) -> bool:
        return self.moe is None and self.mla is None

    # ---- counting: one place for parameters, bytes and FLOPs (used by the capacity model and the harness) ----
    # Conventions: SwiGLU MLP (gate, up, down: 3·H·I), RMSNorm weights only, no biases except the q/k/v bias of
    # `attention_bias`. MoE router is a bias-free H×E linear; DeepSeek-V3's router adds an E-vector score bias.
    # The DeepSeek-V3 MTP module is not part of `num_layers` and is not counted (671B "main model").

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """LM-head matrix (the same tensor as the embedding when tied; counted once in `param_count`)."""
        return self.vocab_size * self.hidden_size

    def attention_params(self) -> int:
        """One layer's attention: projections (GQA or MLA), their norms and biases; excludes the input norm."""
        H, nh = self.hidden_size, self.num_heads
        if self.mla:
            m = self.mla
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:  # q: H -> q_lora (norm) -> nh·qk
                q = H * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * nh * qk
            else:
                q = H * nh * qk
            kv = H * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # latent + shared rope key, latent norm
            kv += m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim)  # up-projection to per-head k_nope, v
            return q + kv + nh * m.v_head_dim * H
        hd, nkv = self.head_dim, self.num_kv_heads
        n = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
        if self.attention_bias:
            n += nh * hd + 2 * nkv * hd
        if self.qk_norm:
            n += 2 * hd
        return n

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed (or shared) expert: a SwiGLU MLP of moe_intermediate_size."""
        assert self.moe
        return 3 * self.hidden_size * self.moe.moe_intermediate_size

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe.is_moe_layer(i) for i in range(self.num_layers)) if self.moe else 0

    def router_params(self) -> int:
        if not self.moe:
            return 0
        bias = self.moe.num_experts if self.family == "deepseek_v3" else 0  # e_score_correction_bias
        return self.hidden_size * self.moe.num_experts + bias

    def _layer_params(self, active: bool = False) -> int:
        """All layers, with every routed expert of each MoE layer (`active`: the top-k a token is routed to)."""
        per_layer = self.attention_params() + 2 * self.hidden_size  # + input and post-attention norms
        n = self.num_layers * per_layer
        if not self.moe:
            return n + self.num_layers * self.dense_mlp_params
        m = self.moe
        experts = m.experts_per_token if active else m.num_experts
        n += (self.num_layers - self.num_moe_layers) * self.dense_mlp_params
        n += self.num_moe_layers * (self.router_params() + (experts + m.shared_experts) * self.expert_params)
        return n

    def param_count(self) -> int:
        """Total parameters: embeddings, LM head (once if tied), all layers, final norm."""
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return int(self.embedding_params + head + self._layer_params() + self.hidden_size)

    def active_param_count(self) -> int:
        """Parameters one token touches: as `param_count` but only top-k routed experts (+ shared ones).
        Counts the embedding table and LM head like DeepSeek's "36.7B incl. 0.9B embedding + 0.9B head"."""
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return int(self.embedding_params + head + self._layer_params(active=True) + self.hidden_size)

    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.moe.num_experts * self.expert_params if self.moe else 0

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> float:
        """KV-cache bytes per token, all layers. MLA caches one latent (kv_lora_rank) plus the shared rope key."""
        if self.mla:
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * self.num_layers * dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    @property
    def attn_dims(self) -> tuple[int, int]:
        """(q·k width, v width) per head: the FLOP dims of attention itself (MLA: 192 and 128 for DeepSeek-V3)."""
        if self.mla:
            return self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim, self.mla.v_head_dim
        return self.head_dim, self.head_dim

    def attention_flops_per_token(self, context: float) -> float:
        """QK^T and PV for one query token against `context` keys, all layers (2 FLOPs per MAC)."""
        dqk, dv = self.attn_dims
        return 2 * self.num_layers * self.num_heads * (dqk + dv) * context

    def flops_per_token(self, context: float = 0) -> float:
        """Forward FLOPs of one token at `context`: 2·(active non-embedding matmul params) + LM head + attention.
        Norm weights and biases are counted as matmul params (they are <0.01% of any model here)."""
        matmul = self.active_param_count() - self.embedding_params
        if self.tie_word_embeddings:
            matmul += self.lm_head_params  # the tied table is still multiplied as the LM head
        return 2 * matmul + self.attention_flops_per_token(context)

    def weight_bytes(self, dtype_bytes: float = 2) -> float:
        """Bytes to hold all weights at one width (norms and routers in fp8 checkpoints are tiny; ignored)."""
        return self.param_count() * dtype_bytes

    def expected_experts_touched(self, batch: float) -> float:
        """Expected distinct routed experts per MoE layer for `batch` tokens, routing uniform and independent:
        E·(1−(1−k/E)^B). Real routers are skewed, which touches fewer experts: this is an upper bound on bytes."""
        if not self.moe:
            return 0.0
        E, k = self.moe.num_experts, self.moe.experts_per_token
        return E * (1 - (1 - k / E) ** max(batch, 0))

    def decode_weight_bytes(self, batch: float, dtype_bytes: float = 2) -> float:
        """Weight bytes one decode step reads: everything but the routed experts and the input-embedding table
        (a decode step gathers B rows of it, not the table), plus the expected distinct routed experts."""
        always = self.param_count() - self.routed_expert_params()
        if not self.tie_word_embeddings:
            always -= self.embedding_params
        touched = self.num_moe_layers * self.expected_experts_touched(batch) * self.expert_params if self.moe else 0
        return (always + touched) * dtype_bytes


    # ---- expert parallelism with data-parallel attention: what each GPU holds, reads and sends ----
    def absorbed_attn_dims(self) -> tuple[int, int]:
        """(q·k width, v width) of MLA's absorbed form (FlashMLA decode): the latent plus the rope key (576 for
        DeepSeek-V3) and the latent as values (512), one latent shared by all heads; GQA: `attn_dims`."""
        if self.mla:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim, self.mla.kv_lora_rank
        return self.attn_dims

    def attention_flops(self, context: float, absorbed: bool = False) -> float:
        """`attention_flops_per_token`, in MLA's absorbed form when `absorbed` (decode kernels: no per-key
        up-projection, each head attends over the latent)."""
        dqk, dv = self.absorbed_attn_dims() if absorbed else self.attn_dims
        return 2 * self.num_layers * self.num_heads * (dqk + dv) * context

    def nonrouted_params(self) -> int:
        """Parameters every expert-parallel rank holds: all but the routed experts (attention, dense MLPs,
        shared experts, routers, embedding, LM head, norms)."""
        return self.param_count() - self.routed_expert_params()

    def experts_per_rank(self, ep: int, redundant: int = 0) -> float:
        """Routed experts (and redundant copies) each of `ep` ranks holds per MoE layer: (E + R)/ep."""
        return (self.moe.num_experts + redundant) / ep if self.moe else 0.0

    def ep_weight_bytes_per_gpu(self, ep: int, redundant: int = 0, dtype_bytes: float = 2) -> float:
        """Weight bytes on one rank of an expert-parallel group: the non-routed part replicated, (E+R)/ep
        routed experts per MoE layer."""
        routed = self.num_moe_layers * self.experts_per_rank(ep, redundant) * self.expert_params if self.moe else 0
        return (self.nonrouted_params() + routed) * dtype_bytes

    def ep_expert_bytes_read(self, tokens_per_rank: float, ep: int, redundant: int = 0,
                             dtype_bytes: float = 2) -> float:
        """Routed-expert bytes one rank reads in one forward, all MoE layers: the experts it holds that the
        group's ep·tokens tokens touch, routing uniform and independent over the E+R copies
        (each copy untouched with probability (1 − k/(E+R))^(ep·tokens))."""
        if not self.moe:
            return 0.0
        slots = self.moe.num_experts + redundant
        touched = 1 - (1 - self.moe.experts_per_token / slots) ** max(ep * tokens_per_rank, 0)
        return self.num_moe_layers * self.experts_per_rank(ep, redundant) * touched * self.expert_params * dtype_bytes

    def alltoall_bytes(self, tokens: float, act_bytes: float) -> float:
        """Bytes one rank sends in one MoE layer's dispatch (or combine): each token's k expert copies of H
        activations at `act_bytes` each (DeepEP's low-latency kernels send every copy)."""
        return tokens * self.moe.experts_per_token * self.hidden_size * act_bytes if self.moe else 0.0

    # ---- tensor parallelism: what each rank holds ----
    def kv_replication(self, tp: int) -> float:
        """How many copies of the KV cache `tp` ranks hold together: GQA KV heads are split while tp divides
        them and replicated once tp exceeds them (each rank keeps at least one head); MLA's latent is not split
        by heads at all, so every rank holds all of it (vLLM and SGLang without DP attention)."""
        if self.mla:
            return float(tp)
        return max(1.0, tp / self.num_kv_heads)

    def kv_bytes_per_token_per_gpu(self, tp: int, dtype_bytes: float = 2) -> float:
        return self.kv_bytes_per_token(dtype_bytes) * self.kv_replication(tp) / tp

    # ---- per-op counts of one forward pass (the capacity model's roofline sums over these) ----
    def forward_ops(self, tokens: float, attn_ctx: float, kv_read_tokens: float, logits_tokens: float,
                    weight_bytes: float, kv_bytes_per_token: float, absorbed: float = 0.0):
        """(name, flops, bytes) of one forward over `tokens` new tokens, all layers: each weight read once,
        attention over `attn_ctx` keys per token reading `kv_read_tokens` cached tokens, logits for
        `logits_tokens`; `absorbed` of the attention's query-key pairs (the decode tokens') in MLA's absorbed form.
        MoE reads the expected distinct experts `tokens` touch."""
        L, H = self.num_layers, self.hidden_size
        attn_w = L * (self.attention_params() + 2 * H)  # projections + their norms + the two layer norms
        yield "attn_proj", 2 * tokens * attn_w, attn_w * weight_bytes
        core = (1 - absorbed) * self.attention_flops(attn_ctx) + absorbed * self.attention_flops(attn_ctx, True)
        yield "attn_core", tokens * core, kv_read_tokens * kv_bytes_per_token
        n_dense = L - self.num_moe_layers
        if n_dense:
            w = n_dense * self.dense_mlp_params
            yield "mlp", 2 * tokens * w, w * weight_bytes
        if self.moe:
            nl, ep = self.num_moe_layers, self.expert_params
            k, shared = self.moe.experts_per_token, self.moe.shared_experts
            router = nl * self.router_params()
            touched = self.expected_experts_touched(tokens)
            yield "experts", 2 * tokens * nl * (k + shared) * ep + 2 * tokens * router, \
                (nl * (touched + shared) * ep + router) * weight_bytes
        head = self.lm_head_params + H  # + final norm
        yield "lm_head", 2 * logits_tokens * head, head * weight_bytes


def tp_problem(cfg: ModelConfig, tp: int) -> str | None:
    """Why `cfg` cannot be split over `tp` ranks (None when it can): heads must divide evenly, and KV heads
    must divide tp or be divided by it (replicated when fewer than tp)."""
    if tp < 1:
        return f"tp must be >= 1, got {tp}"
    if cfg.num_heads % tp:
        return f"{cfg.id}: num_heads {cfg.num_heads} is not divisible by tp {tp}"
    kv = cfg.num_kv_heads
    if not cfg.mla and kv % tp and tp % kv:
        return f"{cfg.id}: num_kv_heads {kv} and tp {tp}: neither divides the other"
    return None


# ---- counts of the decoder as built (`tokenfleet.model.decoder`; of the config given: a tp shard or a layer subset
# counts what is measured). Fused QKV and gate/up; the embedding and LM head as separate tables. A dense config counts
# every layer alike; an MoE / MLA config counts through `ModelConfig`'s per-part counts above (every routed expert
# held; a decode step reads the experts its batch touched).
def layer_params(cfg: ModelConfig) -> int:
    """Parameters of one decoder layer: 2 norms, fused QKV (+bias), q/k norms, O, gate+up, down. MoE: the largest
    layer (an MoE layer's attention, norms, router and all of its experts)."""
    if not cfg.is_dense:
        mlp = cfg.dense_mlp_params if cfg.num_moe_layers < cfg.num_layers else 0
        if cfg.moe:
            mlp = max(mlp, cfg.router_params() + (cfg.moe.num_experts + cfg.moe.shared_experts) * cfg.expert_params)
        return cfg.attention_params() + 2 * cfg.hidden_size + mlp
    d, hd, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    qkv = (hq + 2 * hkv) * hd
    return (2 * d + qkv * d + (qkv if cfg.attention_bias else 0) + (2 * hd if cfg.qk_norm else 0)
            + hq * hd * d + 3 * d * inter)


def _layers_params(cfg: ModelConfig) -> int:
    """All layers' parameters (every routed expert of an MoE model)."""
    if cfg.is_dense:
        return cfg.num_layers * layer_params(cfg)
    return cfg._layer_params()


def _active_layer_params(cfg: ModelConfig) -> int:
    """Layer parameters one token multiplies by (top-k routed + shared experts; all of a dense model: its per-part
    count, equal to `_layers_params`' fused one, both pinned to a hand count in tests/test_mutants_spec.py)."""
    return cfg._layer_params(active=True)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts; `lm_head` is 0 when tied (the embedding is the LM head). `layer`: `layer_params`."""
    emb = cfg.vocab_size * cfg.hidden_size
    layers = _layers_params(cfg)
    head = 0 if cfg.tie_word_embeddings else emb
    return {"layer": layer_params(cfg), "layers": layers, "embedding": emb, "lm_head": head,
            "norm": cfg.hidden_size, "total": layers + emb + head + cfg.hidden_size}


def _attention_pairs_flops(cfg: ModelConfig, pairs: float) -> float:
    """QK^T and PV over `pairs` (query, key) pairs summed over the sequences, all layers."""
    dqk, dv = cfg.attn_dims
    return 2 * (dqk + dv) * cfg.num_heads * cfg.num_layers * pairs


def prefill_flops(cfg: ModelConfig, batch: int, prompt_len: int) -> float:
    """2·(active layer params)·tokens + causal attention (QKᵀ and PV over S(S+1)/2 pairs) + LM head on the last
    token. (MLA: attention as prefill runs it, on up-projected 192-wide keys and 128-wide values.)"""
    tokens = batch * prompt_len
    attn = _attention_pairs_flops(cfg, batch * prompt_len * (prompt_len + 1) / 2)
    return 2 * _active_layer_params(cfg) * tokens + attn + 2 * cfg.hidden_size * cfg.vocab_size * batch


def _read_layer_params(cfg: ModelConfig, experts_touched: float | None, tokens: float) -> float:
    """Layer parameters a forward over `tokens` tokens reads: all but the routed experts, plus the routed experts
    touched (`experts_touched`: distinct experts summed over the MoE layers, as measured; None: the expectation under
    uniform routing, `expected_experts_touched`)."""
    if not cfg.moe:
        return _layers_params(cfg)
    routed = cfg.num_moe_layers * cfg.moe.num_experts * cfg.expert_params
    if experts_touched is None:
        experts_touched = cfg.num_moe_layers * cfg.expected_experts_touched(tokens)
    return _layers_params(cfg) - routed + experts_touched * cfg.expert_params


def prefill_bytes(cfg: ModelConfig, batch: int, prompt_len: int, dtype_bytes: int,
                  experts_touched: float | None = None) -> float:
    """Minimum bytes: every weight once (the embedding only for the rows looked up; MoE: the routed experts
    touched), KV written, logits out."""
    tokens = batch * prompt_len
    layers = _read_layer_params(cfg, experts_touched, tokens) + cfg.hidden_size
    head = cfg.vocab_size * cfg.hidden_size
    return dtype_bytes * (layers + head + tokens * cfg.hidden_size + batch * cfg.vocab_size) \
        + tokens * cfg.kv_bytes_per_token(dtype_bytes)


def decode_flops(cfg: ModelConfig, batch: int, context: int) -> float:
    """One step, B new tokens each attending to context+1 positions (MoE: top-k + shared experts per token)."""
    attn = _attention_pairs_flops(cfg, batch * (context + 1))
    return 2 * batch * (_active_layer_params(cfg) + cfg.hidden_size * cfg.vocab_size) + attn


def decode_bytes(cfg: ModelConfig, batch: int, context: int, dtype_bytes: int,
                 experts_touched: float | None = None) -> float:
    """One step: layer weights (MoE: the routed experts touched, see `_read_layer_params`) + LM head once, B
    embedding rows, KV of context+1 positions read per sequence (the new one written first), B logit rows written."""
    kv = cfg.kv_bytes_per_token(dtype_bytes)
    weights = _read_layer_params(cfg, experts_touched, batch) + cfg.hidden_size + cfg.vocab_size * cfg.hidden_size
    return dtype_bytes * (weights + batch * cfg.hidden_size + batch * cfg.vocab_size) + batch * (context + 2) * kv


def load_model_config(name: str) -> ModelConfig:
    return load_named("models", name, ModelConfig)


def all_model_configs() -> dict[str, ModelConfig]:
    return load_all("models", ModelConfig)
