"""Deployments as validated data (`configs/deployments/*.yaml`): how a fleet serves a model — attention parallelism
(tensor-parallel, or data-parallel attention with its group size), expert parallelism, prefill/decode pools or one
mixed pool, batch and token budget per GPU, KV dtype, multi-token prediction, two-micro-batch overlap.

Every field a file sets must be cited in its `sources` (or explained in `assumptions`); every default below cites
where it comes from. Referenced by fleets (`deployments:`) and by `tokenfleet project/capacity --deployment`.
The serving model for these pools is `tokenfleet.capacity.expert`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from tokenfleet.config import ConfigError, Strict, load_named

# SGLang's large-scale EP blog (LMSYS, 2025-05-05, "Deploying DeepSeek with PD Disaggregation and Large-scale Expert
# Parallelism on 96 H100 GPUs"): prefill EP32 at 4k prompts reached 50,302 tokens/s per node with its default EPLB
# and 59,337 with a simulated perfectly balanced EPLB: the step-time cost of real expert load, 59,337/50,302.
IMBALANCE_DEFAULT = 59337 / 50302
IMBALANCE_SOURCE = ("LMSYS/SGLang large-scale EP blog (2025-05-05): prefill EP32, 4k prompts, 50,302 tokens/s per "
                    "node with default EPLB vs 59,337 simulated perfect EPLB -> step time x 1.18")


class MTP(Strict):
    """Multi-token prediction (DeepSeek-V3's MTP module used as a draft): `draft_tokens` proposed per step, each
    accepted with `acceptance` given the one before it."""

    draft_tokens: int = Field(1, ge=1, le=4,
                              description="DeepSeek-V3 ships 1 MTP module (config num_nextn_predict_layers)")
    acceptance: float = Field(gt=0, lt=1, description="DeepSeek-V3 technical report §5.4.3: 85-90% for the 2nd token")


class Pool(Strict):
    """One kind of serving instance: `gpus` GPUs form one expert-parallel group (EP size = gpus), attention data-
    parallel over groups of `attention_tp` GPUs (1: each GPU its own attention rank, the latent KV held once)."""

    gpus: int = Field(ge=1, description="GPUs of one instance = the EP size")
    attention: Literal["dp", "tp"] = Field("dp", description="dp: data-parallel attention; tp: one TP group")
    attention_tp: int | None = Field(None, ge=1, description="GPUs per attention group; default 1 under dp "
                                     "(DeepSeek Day 6: MLA DP32/DP144), all `gpus` under tp")
    batch_per_gpu: int | None = Field(None, ge=1, description="decode/mixed: sequences per GPU at most")
    tokens_per_gpu: int | None = Field(None, ge=1, description="prefill/mixed: tokens per GPU per step (budget)")
    overlap: bool = Field(True, description="two micro-batches hide all-to-all behind compute (DeepSeek Day 6)")

    @model_validator(mode="after")
    def _groups(self) -> Pool:
        if self.gpus % self.group:
            raise ValueError(f"attention_tp {self.group} does not divide gpus {self.gpus}")
        return self

    @property
    def group(self) -> int:
        """GPUs per attention group: the TP degree attention runs at."""
        return self.attention_tp or (self.gpus if self.attention == "tp" else 1)


class DeploymentSpec(Strict):
    id: str
    description: str
    model: str | None = Field(None, description="the model this deployment was published for (informational)")
    gpu: str | None = Field(None, description="the accelerator it was published on (informational)")
    kv_dtype: Literal["bf16", "fp16", "fp8"] = Field("bf16", description="vLLM/SGLang kv_cache_dtype auto = bf16")
    redundant_experts: int = Field(0, ge=0, description="EPLB redundant expert copies per MoE layer over the group")
    imbalance: float = Field(IMBALANCE_DEFAULT, ge=1, description=IMBALANCE_SOURCE)
    dispatch_bytes: float = Field(1.0, gt=0, description="bytes per dispatched activation: FP8 (DeepSeek Day 6)")
    combine_bytes: float = Field(2.0, gt=0, description="bytes per combined activation: BF16 (DeepSeek Day 6)")
    cache_load_gbps_per_node: float | None = Field(
        None, gt=0, description="cache hits held off the GPU (DeepSeek: on-disk 3FS): the KV of each prompt's hits "
        "is loaded at this many GB/s per node, shared by its GPUs, prefetched (overlapped with compute); "
        "None: hits are in HBM (vLLM/SGLang prefix caching)")
    mtp: MTP | None = None
    prefill: Pool | None = None
    decode: Pool | None = None
    mixed: Pool | None = Field(None, description="one pool serving prefill and decode (chunked prefill)")
    assumptions: dict[str, str] = Field(default_factory=dict)
    sources: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> DeploymentSpec:
        if self.mixed is not None and (self.prefill or self.decode):
            raise ValueError("give `mixed`, or `prefill` and `decode`, not both")
        if self.mixed is None and not (self.prefill and self.decode):
            raise ValueError("give `mixed`, or both `prefill` and `decode` (disaggregated)")
        free = {"id", "description", "assumptions", "sources", "model", "gpu"}
        for f in [f for f in type(self).model_fields if f in self.model_fields_set and f not in free]:
            if f not in self.sources and f not in self.assumptions:
                raise ValueError(f"{f} is set without a source or an `assumptions.{f}` reason")
        return self

    @property
    def disaggregated(self) -> bool:
        return self.mixed is None

    def pools(self) -> dict[str, Pool]:
        return {"mixed": self.mixed} if self.mixed else {"prefill": self.prefill, "decode": self.decode}


def load_deployment(name: str) -> DeploymentSpec:
    """A deployment by name (configs/deployments) or path; a bad file is one ConfigError naming file and field."""
    return load_named("deployments", name, DeploymentSpec)


def with_overrides(d: DeploymentSpec, batch_per_gpu: int | None = None, tokens_per_gpu: int | None = None,
                   kv_dtype: str | None = None) -> DeploymentSpec:
    """Command-line flags over a deployment file: batch (decode/mixed pools), token budget (prefill/mixed), KV."""
    upd: dict = {}
    for name, pool in d.pools().items():
        p = {}
        if batch_per_gpu is not None and name != "prefill":
            p["batch_per_gpu"] = batch_per_gpu
        if tokens_per_gpu is not None and name != "decode":
            p["tokens_per_gpu"] = tokens_per_gpu
        if p:
            upd[name] = pool.model_copy(update=p)
    if kv_dtype is not None:
        upd["kv_dtype"] = kv_dtype
    return d.model_copy(update=upd) if upd else d


def check_fits_model(d: DeploymentSpec, m, file=None) -> None:
    """Expert parallelism needs a MoE model; DP attention groups must split the heads."""
    for name, p in d.pools().items():
        if m.num_heads % p.group:
            raise ConfigError(file or d.id, f"{name}.attention_tp",
                              f"{m.id}: num_heads {m.num_heads} is not divisible by {p.group}")


__all__ = ["DeploymentSpec", "IMBALANCE_DEFAULT", "MTP", "Pool", "check_fits_model", "load_deployment",
           "with_overrides"]
