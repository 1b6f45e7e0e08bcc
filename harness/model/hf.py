"""A decoder from a local Hugging Face checkpoint folder (config.json + *.safetensors); nothing is downloaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tokenfleet.dtypes import to_dtype
from tokenfleet.model.decoder import Layer, Transformer, Weights
from tokenfleet.model.spec import ModelConfig, RopeScaling

HF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_hf(hf: dict, name: str = "local", source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json dict (llama / mistral / qwen2 / qwen3)."""
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; known: {', '.join(HF_FAMILIES)}")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias is not supported")
    family = HF_FAMILIES[model_type]
    heads = hf["num_attention_heads"]
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
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
        rope_theta=float(theta), rope_scaling=rope_scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=family == "qwen3",
        attention_bias=bool(hf.get("attention_bias", family == "qwen2")),
        max_position_embeddings=hf.get("max_position_embeddings", 4096), sources=[source],
    )


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

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        wqkv = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        biases = [maybe(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
        bqkv = torch.cat(biases) if all(x is not None for x in biases) else None
        layers.append(Layer(
            attn_norm=take(p + "input_layernorm.weight"), wqkv=wqkv, bqkv=bqkv,
            q_norm=maybe(p + "self_attn.q_norm.weight"), k_norm=maybe(p + "self_attn.k_norm.weight"),
            wo=take(p + "self_attn.o_proj.weight"), mlp_norm=take(p + "post_attention_layernorm.weight"),
            w13=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
            w2=take(p + "mlp.down_proj.weight"),
        ))
        if (bqkv is not None) != cfg.attention_bias or (layers[-1].q_norm is not None) != cfg.qk_norm:
            raise ValueError(f"{path}: layer {i} weights do not match config.json (qkv bias / q_norm)")
    embed = take("embed_tokens.weight")
    weights = Weights(embed=embed, layers=layers, norm=take("norm.weight"),
                      lm_head=embed if tied else take("lm_head.weight"))
    return Transformer(cfg, weights, backend)
