"""MoE router: router logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int32), one Triton kernel.

Two scorings, as transformers implements them:

- `softmax` (Qwen3-MoE, `Qwen3MoeTopKRouter`): p = softmax(logits) in fp32, the k largest, divided by their sum when
  `renormalize` (config `norm_topk_prob`, true for Qwen3-30B-A3B and Qwen3-235B-A22B).
- `sigmoid` (DeepSeek-V3, `DeepseekV3TopkRouter`): s = sigmoid(logits); the choice is made on s + bias
  (`e_score_correction_bias`), group-limited: experts in `n_group` groups, a group scored by the sum of its two best
  choice scores, only the `topk_group` best groups' experts eligible (the others -inf); the weights are s (without the
  bias) of the k chosen, divided by their sum (+1e-20) when `renormalize`, times `scaling`
  (`routed_scaling_factor`; DeepSeek-V3: n_group 8, topk_group 4, 2.5, norm_topk_prob true).

The router's gate projection (hidden @ W_gate.T) is an ordinary GEMM (`gemm`) and not part of this op; this op is the
selection step a serving engine runs as its own kernel (vLLM's `grouped_topk` / `fused_topk`).

Order: the k columns are sorted by choice score, best first, ties to the lower expert id (the reference and the
kernel agree on it; torch.topk's order among ties is unspecified, so make_inputs draws tie-free logits).
Selection runs in fp32 everywhere (the reference too): the oracle checks the same decision, not a wider one.
"""

import torch
from tokenfleet.kernels._triton import check_float, tl, triton

SCORINGS = ("softmax", "sigmoid")
MAX_EXPERTS = 1024  # experts one program holds in registers per token row


@triton.jit
def _router_kernel(
    x_ptr, bias_ptr, w_ptr, ids_ptr,
    T, stride_xt, scaling,
    E: tl.constexpr, GROUPS: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PG: tl.constexpr, TOPK_P2: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
):
    # One program: BLOCK_T token rows, each as [BLOCK_G groups, BLOCK_PG experts] (softmax: one group), fp32.
    rows = tl.program_id(axis=0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_PG)
    expert = offs_g[:, None] * PER_GROUP + offs_p[None, :]  # [BG, BPG]
    valid_e = (offs_g[:, None] < GROUPS) & (offs_p[None, :] < PER_GROUP)
    row_mask = rows < T
    mask = row_mask[:, None, None] & valid_e[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xt + expert[None, :, :], mask=mask,
                other=float("-inf")).to(tl.float32)  # [BT, BG, BPG]
    ninf = float("-inf")
    if SIGMOID:
        score = tl.sigmoid(x)  # padding: sigmoid(-inf) = 0, masked again below
        choice = score
        if HAS_BIAS:
            choice = choice + tl.load(bias_ptr + expert, mask=valid_e, other=0.0).to(tl.float32)[None, :, :]
        choice = tl.where(valid_e[None, :, :], choice, ninf)
        if GROUPS > 1:
            # A group's score: its two best choice scores (the best once: a tie for best still counts twice).
            best = tl.max(choice, axis=2)  # [BT, BG]
            arg = tl.argmax(choice, axis=2)
            second = tl.max(tl.where(offs_p[None, None, :] == arg[:, :, None], ninf, choice), axis=2)
            gscore = tl.where((offs_g < GROUPS)[None, :], best + second, ninf)
            keep = tl.zeros([BLOCK_T, BLOCK_G], dtype=tl.int1)
            for _ in tl.static_range(TOPK_GROUP):
                g = tl.argmax(gscore, axis=1)  # [BT]
                hit = offs_g[None, :] == g[:, None]
                keep = keep | hit
                gscore = tl.where(hit, ninf, gscore)
            choice = tl.where(keep[:, :, None], choice, ninf)
    else:
        choice = x
        mx = tl.max(tl.max(x, axis=2), axis=1)  # [BT]
        ex = tl.exp(x - mx[:, None, None])  # padding: exp(-inf) = 0
        score = ex / tl.sum(tl.sum(ex, axis=2), axis=1)[:, None, None]
    flat_choice = tl.reshape(choice, [BLOCK_T, BLOCK_G * BLOCK_PG])
    flat_score = tl.reshape(score, [BLOCK_T, BLOCK_G * BLOCK_PG])
    flat = tl.arange(0, BLOCK_G * BLOCK_PG)
    offs_k = tl.arange(0, TOPK_P2)
    w = tl.zeros([BLOCK_T, TOPK_P2], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, TOPK_P2], dtype=tl.int32)
    for j in tl.static_range(TOPK):
        pos = tl.argmax(flat_choice, axis=1)  # [BT]: the best left, ties to the lower position (= lower expert)
        hit = flat[None, :] == pos[:, None]
        wj = tl.sum(tl.where(hit, flat_score, 0.0), axis=1)
        idj = (pos // BLOCK_PG) * PER_GROUP + pos % BLOCK_PG
        w = tl.where(offs_k[None, :] == j, wj[:, None], w)
        ids = tl.where(offs_k[None, :] == j, idj[:, None].to(tl.int32), ids)
        flat_choice = tl.where(hit, ninf, flat_choice)
    if RENORM:
        denom = tl.sum(w, axis=1)
        if SIGMOID:
            denom = denom + 1e-20
        w = w / denom[:, None]
    w = w * scaling
    out_mask = row_mask[:, None] & (offs_k[None, :] < TOPK)
    tl.store(w_ptr + rows[:, None] * TOPK + offs_k[None, :], w, mask=out_mask)
    tl.store(ids_ptr + rows[:, None] * TOPK + offs_k[None, :], ids, mask=out_mask)


def _check(logits, bias, top_k, n_group, topk_group, scoring):
    check_float("router", logits)
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"router: need logits [T, E], got {tuple(logits.shape)}")
    e = logits.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"router: scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    if e > MAX_EXPERTS:
        raise ValueError(f"router: {e} experts above {MAX_EXPERTS}")
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"router: n_group {n_group} must divide {e} experts, 1 <= topk_group {topk_group} <= n_group")
    if n_group > 1 and (scoring != "sigmoid" or e // n_group < 2):
        raise ValueError("router: group-limited routing is DeepSeek-V3's (sigmoid, >= 2 experts per group)")
    if not 1 <= top_k <= (e // n_group) * topk_group:
        raise ValueError(f"router: top_k {top_k} outside 1..{(e // n_group) * topk_group} eligible experts")
    if bias is not None and (scoring != "sigmoid" or bias.shape != (e,) or bias.device != logits.device):
        raise ValueError(f"router: bias is sigmoid scoring's [{e}] on {logits.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")


def router(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
           scoring: str = "softmax", renormalize: bool = True,
           scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype), bias [E] or None (sigmoid only) -> (weights [T, top_k] fp32,
    ids [T, top_k] int32), columns best first. See the module docstring for the two scorings."""
    _check(logits, bias, top_k, n_group, topk_group, scoring)
    t, e = logits.shape
    w = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return w, ids
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    per_group = e // n_group
    block_g, block_pg = triton.next_power_of_2(n_group), triton.next_power_of_2(per_group)
    block_t = max(1, min(16, 4096 // (block_g * block_pg), triton.next_power_of_2(t)))
    _router_kernel[(triton.cdiv(t, block_t),)](
        logits, bias if bias is not None else logits, w, ids,
        t, logits.stride(0), float(scaling),
        E=e, GROUPS=n_group, PER_GROUP=per_group, TOPK_GROUP=topk_group, TOPK=top_k,
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_PG=block_pg,
        SIGMOID=scoring == "sigmoid", HAS_BIAS=bias is not None, RENORM=bool(renormalize),
        TOPK_P2=triton.next_power_of_2(top_k), num_warps=4,
    )
    return w, ids


def router_ref(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1, topk_group: int = 1,
               scoring: str = "softmax", renormalize: bool = True,
               scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit torch reference: selection in fp32 with a stable sort (ties to the lower id), weights in >= fp32."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(torch.float32)
    t, e = x.shape
    if scoring == "softmax":
        choice = x
        weights_all = torch.softmax(logits.to(compute), dim=-1)
    else:
        s32 = torch.sigmoid(x)
        choice = s32 + (bias.to(torch.float32) if bias is not None else 0.0)
        weights_all = torch.sigmoid(logits.to(compute))
        if n_group > 1:
            per = e // n_group
            top2 = torch.sort(choice.view(t, n_group, per), dim=-1, descending=True, stable=True)[0][..., :2]
            gscore = top2.sum(-1)
            gorder = torch.sort(gscore, dim=-1, descending=True, stable=True)[1][:, :topk_group]
            keep = torch.zeros((t, n_group), dtype=torch.bool, device=x.device).scatter_(1, gorder, True)
            choice = choice.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True)[1][:, :top_k]
    w = weights_all.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if scoring == "sigmoid" else 0.0))
    return (w * scaling).to(torch.float32), ids.to(torch.int32)


def router_baseline(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int = 1,
                    topk_group: int = 1, scoring: str = "softmax", renormalize: bool = True,
                    scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch path as transformers writes it (Qwen3MoeTopKRouter, DeepseekV3TopkRouter): softmax/sigmoid in fp32,
    torch.topk (sorted, so the columns come best first like the kernel's)."""
    x = logits.float()
    if scoring == "softmax":
        probs = torch.softmax(x, dim=-1)
        w, ids = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w * scaling, ids.to(torch.int32)
    scores = x.sigmoid()
    choice = scores + bias if bias is not None else scores
    if n_group > 1:
        t, e = choice.shape
        gscore = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        gidx = torch.topk(gscore, k=topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gscore).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(t, e)
        choice = choice.masked_fill(~smask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1)[1]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling, ids.to(torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# Shapes, counts, inputs

# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3): scoring_func sigmoid, n_group 8, topk_group 4,
# routed_scaling_factor 2.5, norm_topk_prob true. Qwen3-MoE (Qwen/Qwen3-30B-A3B config.json): softmax, norm_topk_prob
# true. A ModelConfig names only its family, so the family picks these.
_FAMILY_ROUTING = {
    "deepseek_v3": {"scoring": "sigmoid", "n_group": 8, "topk_group": 4, "scaling": 2.5},
    "qwen3_moe": {"scoring": "softmax", "n_group": 1, "topk_group": 1, "scaling": 1.0},
}


def model_shapes(cfg, tokens=(), batch=(), context=()) -> list[dict]:
    """The router of an MoE `cfg` (ModelConfig with `moe`) for each token count; none for a dense model."""
    if cfg.moe is None:
        return []
    routing = _FAMILY_ROUTING.get(cfg.family, _FAMILY_ROUTING["qwen3_moe"])
    return [{"tokens": t, "experts": cfg.moe.num_experts, "topk": cfg.moe.experts_per_token, **routing,
             "source": f"{cfg.id}.router"} for t in tokens]


MODEL_GRID = ("tokens",)
SHAPE_FIELDS = ("tokens", "experts", "topk")  # sizes make_inputs reads (+ scoring, n_group, topk_group, scaling)


def flops(shape: dict) -> int:
    # Per logit: the score (exp or sigmoid: ~4 ops) and one compare per selection pass (top_k + top_k_group passes).
    t, e, k = shape["tokens"], shape["experts"], shape["topk"]
    return t * e * (4 + k + shape.get("topk_group", 1))


def bytes_moved(shape: dict, dtype: torch.dtype) -> int:
    # logits read, bias read (sigmoid), fp32 weights and int32 ids written.
    t, e, k = shape["tokens"], shape["experts"], shape["topk"]
    bias = 4 * e if shape.get("scoring", "softmax") == "sigmoid" else 0
    return t * e * dtype.itemsize + bias + 8 * t * k


def make_inputs(shape: dict, dtype: torch.dtype, device, seed: int) -> tuple:
    """(logits, bias, top_k, n_group, topk_group, scoring, renormalize, scaling). The logits of a row are distinct
    values (a random permutation of a grid every float dtype holds exactly), so the selection has no ties and every
    implementation must choose the same experts; the bias is small (|b| < 0.01, as trained correction biases are
    next to sigmoid scores in (0, 1))."""
    g = torch.Generator(device=device).manual_seed(seed)
    t, e = shape["tokens"], shape["experts"]
    scoring = shape.get("scoring", "softmax")
    # Integers in [-E/2, E/2) times a power of two: exact in bf16 (8 significant bits) for E <= 512, in fp16 and
    # fp32 for every E the kernel takes.
    step = 4.0 / triton.next_power_of_2(e)
    perm = torch.rand((t, e), generator=g, device=device).argsort(dim=-1)
    logits = ((perm - e // 2).to(torch.float32) * step).to(dtype)
    bias = None
    if scoring == "sigmoid":
        bias = (torch.rand((e,), generator=g, device=device) - 0.5) * 0.02
    return (logits, bias, shape["topk"], shape.get("n_group", 1), shape.get("topk_group", 1), scoring,
            bool(shape.get("renormalize", True)), float(shape.get("scaling", 1.0)))


def tolerance(dtype: torch.dtype) -> float:
    # fp32 weights from the same fp32 selection: exp/sigmoid approximations on GPU within a few fp32 ulps; the ids
    # are exact (any different expert is an error of order one).
    return 1e-5
