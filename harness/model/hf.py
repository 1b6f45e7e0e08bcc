"""A decoder from a local Hugging Face checkpoint folder (config.json + *.safetensors); nothing is downloaded.

Dense Llama / Mistral / Qwen2 / Qwen3, and the MoE families: Qwen3-MoE and DeepSeek-V3 (experts stored one module per
expert as released checkpoints and transformers' save_pretrained write them, fused here into [E, 2·I, D] / [E, D, I];
DeepSeek's interleaved rope channels are permuted once into the rotate-half order the rope ops use, which leaves
every q·k product as transformers computes it). Block-fp8 checkpoints (DeepSeek-V3's release) are not read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tokenfleet.dtypes import to_dtype
from tokenfleet.model.decoder import Layer, Transformer, Weights
from tokenfleet.model.moe import MLAWeights, MoEWeights
from tokenfleet.model.spec import MLA, ModelConfig, MoE, RopeScaling

HF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
               "deepseek_v3": "deepseek_v3"}


def config_from_hf(hf: dict, name: str = "local", source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (llama / mistral / qwen2 / qwen3)."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; known: {', '.join(HF_FAMILIES)}")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias is not supported")
    if hf.get("quantization_config"):
        raise ValueError(f"{source}: quantized checkpoints ({hf['quantization_config'].get('quant_method')}) are not "
                         "read")
    family = HF_FAMILIES[model_type]
    heads = hf["num_attention_heads"]
    moe, mla, head_dim = _moe_mla(hf, family)
    rope = hf.get("rope_parameters") or {}  # transformers 5 moved rope_theta / rope_scaling here
    theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    rope_scaling = None
    if kind == "llama3":
        rope_scaling = RopeScaling(rope_type="llama3", factor=scaling["factor"],
                                   low_freq_factor=scaling["low_freq_factor"],
                                   high_freq_factor=scaling["high_freq_factor"],
                                   original_max_position_embeddings=scaling["original_max_position_embeddings"])
    elif kind != "default":
        warnings.warn(f"{source}: rope scaling {scaling} is not applied (plain RoPE with theta {theta}): same cost, "
                      "different logits at long context", stacklevel=2)
    return ModelConfig(
        id=name, hf_repo=hf.get("_name_or_path") or name, family=family,
        hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim or hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        rope_theta=float(theta), rope_scaling=rope_scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=family in ("qwen3", "qwen3_moe"),
        attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
        max_position_embeddings=hf.get("max_position_embeddings", 4096), moe=moe, mla=mla, sources=[source],
    )


def _moe_mla(hf: dict, family: str) -> tuple[MoE | None, MLA | None, int | None]:
    """The MoE and MLA blocks of a Qwen3-MoE / DeepSeek-V3 config.json (transformers' field names), and MLA's
    nominal head_dim (v_head_dim; config.json's head_dim there is the rope width)."""
    if family == "qwen3_moe":
        moe = MoE(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                  experts_per_token=hf["num_experts_per_tok"], moe_intermediate_size=hf["moe_intermediate_size"],
                  sparse_step=hf.get("decoder_sparse_step", 1), mlp_only_layers=hf.get("mlp_only_layers") or [],
                  norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        return moe, None, None
    if family != "deepseek_v3":
        return None, None, None
    if hf.get("attention_bias"):
        raise ValueError("deepseek_v3: attention_bias (biases on the MLA projections) is not built")
    if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"deepseek_v3: routing {hf.get('scoring_func')} / {hf.get('topk_method')} is not "
                         "DeepSeek-V3's (sigmoid, noaux_tc)")
    moe = MoE(num_experts=hf["n_routed_experts"], experts_per_token=hf["num_experts_per_tok"],
              moe_intermediate_size=hf["moe_intermediate_size"], shared_experts=hf.get("n_shared_experts") or 0,
              dense_layers=hf.get("first_k_dense_replace") or 0, scoring="sigmoid",
              norm_topk_prob=bool(hf.get("norm_topk_prob", True)), n_group=hf.get("n_group") or 1,
              topk_group=hf.get("topk_group") or 1, routed_scaling_factor=hf.get("routed_scaling_factor", 1.0))
    mla = MLA(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
              qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
              v_head_dim=hf["v_head_dim"], rope_interleave=bool(hf.get("rope_interleave", True)))
    return moe, mla, hf["v_head_dim"]


def _deinterleave(w: torch.Tensor, rope: int, width: int) -> torch.Tensor:
    """Rows of w in blocks of `width` whose last `rope` rows are rope channels in interleaved pairs (x0, x1), ...:
    those permuted to (x0, x2, ..., x1, x3, ...), the rotate-half order (transformers'
    apply_rotary_pos_emb_interleave rotates exactly so)."""
    perm = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)]) + (width - rope)
    idx = torch.cat([torch.arange(width - rope), perm])
    blocks = w.view(-1, width, *w.shape[1:])
    return blocks[:, idx].reshape(w.shape).contiguous()


def from_pretrained(path: str | Path, backend: str = "torch", dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> Transformer:
    """A model from a local Hugging Face checkpoint folder (config.json + *.safetensors). Nothing is
    downloaded. dtype None: the checkpoint's own (`dtype`/`torch_dtype` in config.json), else bf16."""
    from safetensors import safe_open

    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    dt = to_dtype(dtype or hf.get("dtype") or hf.get("torch_dtype") or "bf16")
    dev = torch.device(device)
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                raw[key.removeprefix("model.")] = st.get_tensor(key)
    tied = "lm_head.weight" not in raw
    hf = {**hf, "tie_word_embeddings": tied}
    cfg = config_from_hf(hf, name=path.name, source=str(path / "config.json"))

    def take(key: str) -> torch.Tensor:
        return raw.pop(key).to(device=dev, dtype=dt)

    def maybe(key: str) -> torch.Tensor | None:
        return take(key) if key in raw else None

    def gate_up(p: str) -> torch.Tensor:
        return torch.cat([take(p + "gate_proj.weight"), take(p + "up_proj.weight")])

    def moe(p: str) -> MoEWeights:
        n, sigmoid = cfg.moe.num_experts, cfg.moe.scoring == "sigmoid"
        if p + "experts.gate_up_proj" in raw:  # transformers' fused in-memory layout
            w13, w2 = take(p + "experts.gate_up_proj"), take(p + "experts.down_proj")
        else:
            w13 = torch.stack([gate_up(f"{p}experts.{e}.") for e in range(n)])
            w2 = torch.stack([take(f"{p}experts.{e}.down_proj.weight") for e in range(n)])
        shared = cfg.moe.shared_experts > 0
        router = raw.pop(p + "gate.weight").to(dev)
        bias = raw.pop(p + "gate.e_score_correction_bias", None)
        return MoEWeights(router=router.float() if sigmoid else router.to(dt),
                          score_bias=bias.to(dev).float() if sigmoid and bias is not None else None, w13=w13, w2=w2,
                          shared_w13=gate_up(p + "shared_experts.") if shared else None,
                          shared_w2=take(p + "shared_experts.down_proj.weight") if shared else None)

    def mla(p: str) -> MLAWeights:
        a = cfg.mla
        rope, qk = a.qk_rope_head_dim, a.qk_nope_head_dim + a.qk_rope_head_dim
        q = take(p + ("q_a_proj.weight" if a.q_lora_rank else "q_proj.weight"))
        kv_a = take(p + "kv_a_proj_with_mqa.weight")
        q_b = maybe(p + "q_b_proj.weight")
        if a.rope_interleave:
            kv_a = _deinterleave(kv_a, rope, kv_a.shape[0])
            if q_b is not None:
                q_b = _deinterleave(q_b, rope, qk)
            else:
                q = _deinterleave(q, rope, qk)
        return MLAWeights(wa=torch.cat([q, kv_a]), q_norm=maybe(p + "q_a_layernorm.weight"), wq_b=q_b,
                          kv_norm=take(p + "kv_a_layernorm.weight"), wkv_b=take(p + "kv_b_proj.weight"))

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        wqkv = bqkv = None
        if not cfg.mla:
            wqkv = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            bqkv = torch.cat(biases) if all(x is not None for x in biases) else None
        sparse = cfg.moe is not None and cfg.moe.is_moe_layer(i)
        layers.append(Layer(
            attn_norm=take(p + "input_layernorm.weight"), wqkv=wqkv, bqkv=bqkv,
            q_norm=maybe(p + "self_attn.q_norm.weight"), k_norm=maybe(p + "self_attn.k_norm.weight"),
            mla=mla(p + "self_attn.") if cfg.mla else None,
            wo=take(p + "self_attn.o_proj.weight"), mlp_norm=take(p + "post_attention_layernorm.weight"),
            w13=None if sparse else gate_up(p + "mlp."), w2=None if sparse else take(p + "mlp.down_proj.weight"),
            moe=moe(p + "mlp.") if sparse else None,
        ))
        if (bqkv is not None) != cfg.attention_bias or (layers[-1].q_norm is not None) != cfg.qk_norm:
            raise ValueError(f"{path}: layer {i} weights do not match config.json (qkv bias / q_norm)")
    embed = take("embed_tokens.weight")
    weights = Weights(embed=embed, layers=layers, norm=take("norm.weight"),
                      lm_head=embed if tied else take("lm_head.weight"))
    return Transformer(cfg, weights, backend)
