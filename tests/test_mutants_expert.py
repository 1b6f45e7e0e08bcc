"""Oracles for tokenfleet.capacity.expert (`make mutate`): one GPU's step in an expert-parallel pool, the all-to-all
times, the measured expert curve, MTP's emitted tokens. The step runs on a paper model (4 layers, 1 dense + 3 MoE,
H = 10, attention 40 params a layer, experts 30, router 5, LM head 100; expert bytes read 100·t²·wb for t tokens) on a
paper GPU (1000 FLOP/s bf16, 100 B/s, efficiencies 1/2, overhead 1 s), so every term is worked out by hand below."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest
from tokenfleet.capacity import expert as X
from tokenfleet.capacity.calibrate import Efficiency


def approx(x):
    """Tight: a mutant that moves a figure by a part in 1e9 (1e9 -> 1000000001.0) must fail."""
    return pytest.approx(x, rel=1e-12, abs=1e-18)


class PM:
    def __init__(self, moe=True, L=4, H=10, dense_layers=1, k=2, shared=1, E=8):
        self.num_layers, self.hidden_size = L, H
        self.moe = NS(experts_per_token=k, shared_experts=shared, dense_layers=dense_layers, num_experts=E) \
            if moe else None
        self.num_moe_layers = L - dense_layers if moe else 0
        self.dense_mlp_params, self.expert_params, self.lm_head_params = 50, 30, 100
        self.reads = []

    def kv_bytes_per_token(self, db):
        return 8 * db

    def kv_replication(self, g):
        return g

    def attention_params(self):
        return 40

    def attention_flops(self, ctx, absorbed=False):
        return ctx * (300 if absorbed else 100)

    def router_params(self):
        return 5

    def ep_expert_bytes_read(self, t, ep, red, wb):
        self.reads.append((t, ep, red, wb))
        return 100 * t * t * wb

    def alltoall_bytes(self, t, b):
        return t * self.moe.experts_per_token * self.hidden_size * b if self.moe else 0.0

    def ep_weight_bytes_per_gpu(self, ep, red, wb):
        return (1000 + 100 * (8 + red) / ep) * wb

    def weight_bytes(self, wb):
        return 5000 * wb


class NoReads(PM):
    def ep_expert_bytes_read(self, t, ep, red, wb):
        return 0.0


def gpu(gbps=10.0, fp8=True, hid="toy"):
    peaks = {"bf16": 1000.0, "fp8": 2000.0 if fp8 else None}
    ic = NS(type="NVLink", per_direction_gbps=gbps) if gbps else None
    return NS(id=hid, peak=lambda d: peaks.get(d), bandwidth_bytes_per_s=100.0, interconnect=ic)


EFF = Efficiency(compute=0.5, memory=0.5, overhead_ms=1000.0)


def ps(m=None, a2a=None, **kw):
    base = dict(m=m or PM(), hw=gpu(), dtype="bf16", kv_dtype="bf16", ep=4, eff=EFF)
    p = X.PoolStep(**{**base, **kw})
    if a2a is not None:
        p.alltoall_s = lambda T: a2a  # the step's composition checked apart from the all-to-all model
    return p


def test_constants():
    assert X.DEEPEP_LOW_LATENCY_GBPS == {8: (98, 127), 16: (63, 74), 32: (48, 53), 64: (43, 46), 128: (39, 39),
                                         256: (39, 40)}
    assert X.DEEPEP_NORMAL_GBPS == {16: (43, 43), 32: (58, 57), 64: (51, 50)}
    assert X.DEEPEP_INTRANODE_FRACTION == (153 / 160, 158 / 160)
    assert X.DEEPEP_NIC_GBPS == 50.0
    assert X.DEEPEP_SOURCE == "DeepEP README bandwidths (H800, CX7 400 Gb/s)"
    assert X.NORMAL_KERNEL_SM_SHARE == 24 / 132


def test_deepep_gbps_log_linear_and_held():
    t = X.DEEPEP_LOW_LATENCY_GBPS
    assert X.deepep_gbps(t, 8) == (98.0, 127.0) and X.deepep_gbps(t, 4) == (98.0, 127.0)
    assert X.deepep_gbps(t, 512) == (39.0, 40.0)
    f = math.log2(12) - 3  # 12 between 8 and 16 on log2
    assert X.deepep_gbps(t, 12) == approx((98 + (63 - 98) * f, 127 + (74 - 127) * f))
    assert X.deepep_gbps(X.DEEPEP_NORMAL_GBPS, 32) == (58.0, 57.0)


def test_emitted_per_step():
    assert X.emitted_per_step(0, 0.5) == 1
    assert X.emitted_per_step(1, 0.5) == 1.5
    assert X.emitted_per_step(3, 0.5) == 1 + 0.5 + 0.25 + 0.125


def test_expert_curve():
    c = X.ExpertCurve([1.0, 4.0], [0.5, 1.5], "lbl")
    assert c(2.0) == approx(1.0) and c(1.0) == 0.5 and c(4.0) == 1.5 and c(100.0) == 1.5 and c(0.0) == 0.5
    assert c.inside(1.0) and c.inside(4.0) and c.inside(1 - 0.5e-9) and c.inside(4 * (1 + 0.5e-9))
    assert not c.inside(1 - 2e-9) and not c.inside(4 * (1 + 2e-9))
    assert c.inside(1.0 * (1 - 1e-9)) and c.inside(4.0 * (1 + 1e-9))  # the edges themselves
    c = X.ExpertCurve([1.0, 2.0, 4.0], [0.5, 1.0, 1.5], "lbl")
    assert c.inside(3.0) and not c.inside(5.0)
    c = X.ExpertCurve([0.25, 1.0], [1.0, 2.0], "lbl")  # below one token: still log-linear, down to 1e-9
    assert c(0.5) == approx(1.5) and c(0.0) == 1.0


# ---- setup -----------------------------------------------------------------------------------------------------
def test_defaults_and_figures():
    p = X.PoolStep(PM(), gpu(), "bf16", "bf16", 4)
    assert (p.group, p.redundant, p.imbalance, p.overlap, p.kind, p.mtp_drafts, p.dispatch_bytes, p.combine_bytes,
            p.eff, p.notes, p.alltoall, p.cache_load_gbps, p.experts) == \
        (1, 0, 1.0, True, "decode", 0, 1.0, 2.0, Efficiency(), [], None, None, None)
    p = ps(dtype="fp8", kv_dtype="fp8", group=2)
    assert (p.wb, p.kvb, p.mm_peak, p.attn_peak, p.bw, p.scaleup) == (1, 8 * 1 * 2, 1000.0, 500.0, 50.0, 10.0)
    assert ps().kvb == 16 and ps().wb == 2 and ps().mm_peak == 500.0
    assert ps(hw=gpu(gbps=None)).scaleup == 64.0
    assert ps(hw=NS(**{**vars(gpu()), "interconnect": NS(type="x", per_direction_gbps=None)})).scaleup == 64.0
    p = ps(dtype="fp8", hw=gpu(fp8=False, hid="a100"))
    assert (p.mm_peak, p.notes) == (500.0, ["a100 has no fp8 peak: fp8 weights, bf16 compute"])


def test_a2a_source():
    assert ps(m=PM(moe=False)).a2a_source is None
    assert ps(ep=1).a2a_source is None
    assert ps(ep=16, alltoall=(None, "run r")).a2a_source == "run r"
    assert ps(ep=2).a2a_source == ps(ep=8).a2a_source == \
        "DeepEP README bandwidths (H800, CX7 400 Gb/s): intranode fraction of toy's 10 GB/s scale-up link"
    assert ps(ep=16).a2a_source == \
        "DeepEP README bandwidths (H800, CX7 400 Gb/s): low-latency kernels at EP 16, 50 GB/s NIC per GPU"
    assert ps(ep=9, kind="prefill").a2a_source == \
        "DeepEP README bandwidths (H800, CX7 400 Gb/s): normal kernels at EP 9, 50 GB/s NIC per GPU"
    assert ps(ep=16, kind="mixed").a2a_source.endswith("normal kernels at EP 16, 50 GB/s NIC per GPU")


# ---- all-to-all: 1e6 tokens x k 2 x H 10 = 2e7 bytes dispatched (1 byte), 4e7 combined (2 bytes) ---------------------
LAT = 10e-6


def test_alltoall_none_without_experts_or_peers():
    assert ps(m=PM(moe=False), ep=16).alltoall_s(1e6) == (0.0, 0.0)
    assert ps(ep=1).alltoall_s(1e6) == (0.0, 0.0)


def test_alltoall_measured_curve():
    p = ps(ep=16, alltoall=(lambda b: b / 1e6, "r"))
    assert p.alltoall_s(1e6) == (20 * 1e-3, 40 * 1e-3)  # ms off the curve at each message's bytes
    p = ps(ep=16, alltoall=(lambda b: b / 1e6, "r"), dispatch_bytes=2.0, combine_bytes=0.5)
    assert p.alltoall_s(1e6) == (40 * 1e-3, 10 * 1e-3)


def test_alltoall_inside_one_node():
    for ep in (2, 8):
        d, c = ps(ep=ep).alltoall_s(1e6)
        off = (ep - 1) / ep
        assert d == approx(LAT + 2e7 * off / (10 * 153 / 160 * 1e9))
        assert c == approx(LAT + 4e7 * off / (10 * 158 / 160 * 1e9))


def test_alltoall_low_latency_kernels_for_decode():
    d, c = ps(ep=16).alltoall_s(1e6)
    assert (d, c) == (approx(LAT + 2e7 / 63e9), approx(LAT + 4e7 / 74e9))
    d, c = ps(ep=9).alltoall_s(1e6)
    f = math.log2(9) - 3
    assert (d, c) == (approx(LAT + 2e7 / ((98 + (63 - 98) * f) * 1e9)),
                      approx(LAT + 4e7 / ((127 + (74 - 127) * f) * 1e9)))


def test_alltoall_normal_kernels_for_prefill():
    # EP 16: 2 nodes; of k = 2 copies, the remote node gets one copy with probability 1 - (1/2)^2 = 3/4:
    # bytes share 2 * 3/4 * 1/2 / 2 = 0.375
    d, c = ps(ep=16, kind="prefill").alltoall_s(1e6)
    assert (d, c) == (approx(LAT + 2e7 * 0.375 / 43e9), approx(LAT + 4e7 * 0.375 / 43e9))
    # EP 32: 4 nodes: 4 * (1 - (3/4)^2) * 3/4 / 2 = 0.65625
    d, c = ps(ep=32, kind="mixed").alltoall_s(1e6)
    assert (d, c) == (approx(LAT + 2e7 * 0.65625 / 58e9), approx(LAT + 4e7 * 0.65625 / 57e9))
    # EP 9: 2 nodes (a ninth GPU starts one), k = 3: 2 * (1 - (1/2)^3) * 1/2 / 3 = 0.2916..; held at EP 16's figure
    d, c = ps(ep=9, kind="prefill", m=PM(k=3)).alltoall_s(1e6)
    assert d == approx(LAT + 3e7 * (2 * (1 - 0.125) * 0.5 / 3) / 43e9)


def test_cache_load():
    p = ps(cache_load_gbps=8.0)  # 1 GB/s for each of a node's 8 GPUs; 16 bytes of KV a token
    assert p.cache_load_s(1e9) == approx(16.0)
    assert p.cache_load_s(1) == approx(16 / 1e9) and p.cache_load_s(0) == 0.0
    assert ps().cache_load_s(1e9) == 0.0


def test_weight_bytes_per_gpu():
    assert ps(ep=4, redundant=4).weight_bytes_per_gpu() == (1000 + 100 * 12 / 4) * 2
    assert ps(ep=4, group=2).weight_bytes_per_gpu() == (1000 + 100 * 8 / 4) * 2 - 4 * 40 * 0.5 * 2
    assert ps(m=PM(moe=False), group=4, dtype="fp8").weight_bytes_per_gpu() == 5000 - 4 * 40 * 0.75 * 1


# ---- the step -------------------------------------------------------------------------------------------------------
# 2 decode sequences at context 100, bf16 (2 bytes), no overlap: one read of each weight, T = 2 tokens.
#   attention weights 4 * (40 + 2*10) = 240: matmul max(2*2*240/500, 240*2/50) = max(1.92, 9.6) = 9.6
#   core (absorbed): 2 * 100*300 = 60000 FLOPs, KV 2*100*16 = 3200 B: max(120, 64) = 120
#   dense MLP (1 layer, 50): max(2*2*50/500, 50*2/50) = max(0.4, 2) = 2
#   MoE (3 layers): shared + router 3*(30 + 5) = 105, routed FLOPs 2*2*2*3*30 = 720, expert bytes 100*2²*2 = 800:
#       max((420 + 720)/500, (210 + 800)/50) = max(2.28, 20.2) = 20.2
#   head 110: max(2*2*110/500, 220/50) = max(0.88, 4.4) = 4.4
#   all-to-all (1, 2) per MoE layer: 3 * 3 = 9
def test_decode_step_without_overlap():
    m = PM()
    p = ps(m=m, a2a=(1.0, 2.0), overlap=False)
    s = p.step(2, 100)
    compute = 9.6 + 120 + 2 + 20.2 + 4.4
    assert s == approx({
        "attention_s": 129.6, "kv_bytes": 3200, "flops": 60960 + 200 + 1140, "expert_bytes": 800, "dense_s": 2,
        "moe_s": 20.2, "head_s": 4.4, "dispatch_s": 3, "combine_s": 6, "alltoall_s": 9, "allreduce_s": 0,
        "compute_s": compute, "hidden_s": 0, "imbalance_s": 0, "overhead_s": 1, "expert_read_s": 16,
        "kv_read_s": 64, "cache_load_s": 0, "step_s": compute + 9 + 1, "tokens": 2})
    assert m.reads == [(2, 4, 0, 2)]


def test_decode_step_with_two_micro_batches():
    # each weight read twice: attention max(1.92, 19.2) + 120 = 139.2, dense 4, head 8.8; expert bytes 2 * 100*1²*2
    # = 400: MoE max(2.28, (420 + 400)/50) = 16.4. Per layer attention 139.2/4 = 34.8, MoE 16.4/3
    m = PM()
    p = ps(m=m, a2a=(50.0, 3.0), redundant=8)
    s = p.step(2, 100)
    per_moe = 16.4 / 3
    moe_part = 3 * (max(34.8, 50.0) + max(per_moe, 3.0))
    step = (139.2 - 3 * 34.8) + 4 + 8.8 + moe_part
    assert s["step_s"] == approx(step + 1)
    assert (s["attention_s"], s["dense_s"], s["moe_s"], s["head_s"]) == approx((139.2, 4, 16.4, 8.8))
    assert s["hidden_s"] == approx(139.2 + 4 + 16.4 + 8.8 + 3 * 53 - step)
    assert (s["expert_bytes"], s["expert_read_s"]) == (400, 8)
    assert m.reads == [(1, 4, 8, 2)]
    s = ps(a2a=(1.0, 2.0)).step(2, 100)  # all-to-all shorter than compute: fully hidden
    assert s["step_s"] == approx(139.2 + 4 + 16.4 + 8.8 + 1)
    assert s["hidden_s"] == approx(9)


def test_prefill_step_overlap_slows_the_compute_it_shares_with_the_kernels():
    # 6 prefill tokens from 2 prompts at mean context 50, each reading 40 tokens' KV; two micro-batches
    #   attention max(2*6*240/500, 19.2) = 19.2 + core max(6*50*100/500, 2*40*16/50) = max(60, 25.6) = 60 -> 79.2
    #   dense max(1.2, 4) = 4; MoE: 2*6*105 + 2*6*2*3*30 = 1260 + 2160 FLOPs, 420 + 2*100*3²*2 = 4020 B -> 80.4
    #   head: 2 logits, max(2*2*110/500, 8.8) = 8.8
    slow = 132 / 108
    for kind, ep in (("prefill", 4), ("mixed", 4), ("prefill", 2)):
        s = ps(a2a=(10.0, 20.0), kind=kind, ep=ep).step(0, 0, 6, 2, 50, 40)
        per_attn, per_moe = 79.2 / 4 * slow, 80.4 / 3 * slow
        step = (79.2 - 3 * 79.2 / 4) + 4 + 8.8 + 3 * (max(per_attn, 10) + max(per_moe, 20))
        assert (s["attention_s"], s["moe_s"], s["head_s"], s["kv_bytes"], s["tokens"]) == \
            approx((79.2, 80.4, 8.8, 1280, 6))
        assert s["flops"] == approx(2880 + 30000 + 2 * 6 * 50 + 1260 + 2160)
        assert s["step_s"] == approx(step + 1)
    s = ps(a2a=(10.0, 20.0), kind="prefill", ep=1).step(0, 0, 6, 2, 50, 40)  # one GPU: no kernels, no slowdown
    assert s["step_s"] == approx((79.2 - 3 * 79.2 / 4) + 4 + 8.8 + 3 * (max(79.2 / 4, 10) + max(26.8, 20)) + 1)


def test_mtp_drafts_add_tokens_and_a_layer():
    # 1 draft: 2 sequences carry 4 tokens; the MTP module is one more layer: attention x 5/4, MoE x 4/3, 4 MoE
    # all-to-alls. Attention: max(3.84, 9.6) + max(4*100*300/500, 64) = 249.6, x 5/4 = 312; dense max(0.8, 2) = 2;
    # MoE: 840 + 1440 FLOPs, 210 + 100*4²*2 = 3410 B: max(4.56, 68.2) = 68.2, x 4/3; head max(2*6*110/500, 4.4)
    s = ps(a2a=(1.0, 2.0), overlap=False, mtp_drafts=1).step(2, 100)
    moe = 68.2 * 4 / 3
    assert (s["attention_s"], s["moe_s"], s["head_s"], s["dispatch_s"], s["combine_s"], s["tokens"]) == \
        approx((312, moe, 4.4, 4, 8, 4))
    assert s["flops"] == approx((1920 + 120000) * 1.25 + 400 + 2280 * 4 / 3)
    assert s["step_s"] == approx(312 + 2 + moe + 4.4 + 12 + 1)
    s = ps(a2a=(200.0, 2.0), mtp_drafts=1).step(2, 100)  # overlapped: per layer over 5 attention, 4 MoE layers
    att = (max(3.84, 19.2) + 240) * 1.25
    moe = max(4.56, (420 + 2 * 100 * 2**2 * 2) / 50) * 4 / 3
    assert s["step_s"] == approx((att - 4 * att / 5) + 4 + 8.8 + 4 * (200 + max(moe / 4, 2.0)) + 1)
    # the head's logits: every token plus a draft per sequence (compute-bound at 100 sequences)
    s = ps(a2a=(0.0, 0.0), mtp_drafts=1).step(100, 1)
    assert s["head_s"] == approx(2 * (200 + 100) * 110 / 500)
    # compute-bound at 200 tokens: attention 2*200*240/500 + 200*300/500, dense 2*200*50/500
    assert s["attention_s"] == approx((2 * 200 * 240 / 500 + 200 * 300 / 500) * 5 / 4)
    assert s["dense_s"] == approx(2 * 200 * 50 / 500)
    s = ps(m=NoReads(), a2a=(0.0, 0.0), mtp_drafts=1).step(100, 1)  # no expert bytes: MoE compute-bound too
    assert s["moe_s"] == approx((2 * 200 * 105 + 2 * 200 * 2 * 3 * 30) / 500 * 4 / 3)
    s = ps(a2a=(0.0, 0.0), mtp_drafts=1).step(0, 0, 600, 200, 1, 1)  # prefill alone: no draft, a logit a prompt
    assert s["head_s"] == approx(2 * 200 * 110 / 500)
    assert (s["dispatch_s"], s["tokens"]) == (0.0, 600)


def test_attention_groups_split_weights_and_all_reduce():
    # group 2: attention weights halved per GPU, KV of 2 copies (32 B a token), one all-reduce a layer
    s = ps(a2a=(0.0, 0.0), overlap=False, group=2).step(2, 100)
    assert s["attention_s"] == approx(max(1.92, 240 / 2 * 2 / 50) + max(120, 2 * 100 * 32 / 50))
    ar = 4 * (10e-6 + 2 * (1 / 2) * (2 * 2 * 10 * 2) / 10e9)
    assert s["allreduce_s"] == approx(ar)
    assert s["step_s"] == approx(s["compute_s"] + ar + 1) and s["hidden_s"] == approx(0)
    s = ps(a2a=(0.0, 0.0), overlap=False, group=4).step(2, 100)
    assert s["allreduce_s"] == approx(4 * (10e-6 + 2 * (3 / 4) * (2 * 4 * 10 * 2) / 10e9))


def test_imbalance_and_cache_load():
    base = ps(a2a=(1.0, 2.0), overlap=False).step(2, 100)["step_s"] - 1
    s = ps(a2a=(1.0, 2.0), overlap=False, imbalance=1.5).step(2, 100)
    assert (s["step_s"], s["imbalance_s"]) == approx((base * 1.5 + 1, base * 0.5))
    # prompts' cache hits at 8 GB/s a node = 1e9 B/s a GPU: 2 prompts x 1e10 tokens x 16 B = 320 s binds
    p = ps(a2a=(1.0, 2.0), cache_load_gbps=8.0, imbalance=1.5)
    s = p.step(0, 0, 6, 2, 50, 40, 1e10)
    assert (s["cache_load_s"], s["step_s"]) == approx((320, 321))
    s2 = p.step(0, 0, 6, 2, 50, 40, 1e6)  # a small load hides behind the step
    assert s2["cache_load_s"] == approx(0.032)
    assert s2["step_s"] == approx(p.step(0, 0, 6, 2, 50, 40)["step_s"])


def test_measured_expert_time_inside_its_tokens():
    curve = X.ExpertCurve([1.0, 4.0], [0.5, 1.5], "lbl")
    # no overlap, T = 2 inside: shared + router max(2*2*105/500, 105*2/50) = 4.2, + 3 layers x curve(2) = 1.0
    s = ps(a2a=(0.0, 0.0), overlap=False, experts=curve).step(2, 100)
    assert (s["moe_s"], s["expert_bytes"]) == approx((4.2 + 3.0, 800)) and s["experts_source"] == "lbl"
    # two micro-batches: each carries T/2 = 1 token: 2 x 3 x curve(1) = 3.0, the shared weights read twice
    s = ps(a2a=(0.0, 0.0), experts=curve).step(2, 100)
    assert s["moe_s"] == approx(8.4 + 3.0) and s["experts_source"] == "lbl"
    s = ps(a2a=(0.0, 0.0), overlap=False, experts=curve, mtp_drafts=1).step(2, 100)  # T = 4, the edge; x 4/3
    assert s["moe_s"] == approx((max(840 / 500, 210 / 50) + 3 * 1.5) * 4 / 3)
    wide = X.ExpertCurve([1.0, 1000.0], [1.0, 1.0], "w")  # 200 tokens: the shared experts compute-bound
    s = ps(a2a=(0.0, 0.0), overlap=False, experts=wide).step(200, 1)
    assert s["moe_s"] == approx(2 * 200 * 105 / 500 + 3 * 1.0)
    s = ps(a2a=(0.0, 0.0), overlap=False, experts=curve).step(5, 100)  # outside: the roofline
    assert "experts_source" not in s and s["moe_s"] == approx(max((2 * 5 * 105 + 2 * 5 * 2 * 3 * 30) / 500,
                                                                          (210 + 100 * 25 * 2) / 50))


def test_dense_model_step():
    m = PM(moe=False, dense_layers=0)
    s = ps(m=m).step(2, 100)  # 4 dense layers of 50, read twice; no all-to-all, nothing overlapped
    dense = max(2 * 2 * 200 / 500, 2 * 200 * 2 / 50)
    att = max(1.92, 19.2) + 120
    assert (s["dense_s"], s["moe_s"], s["dispatch_s"], s["alltoall_s"], s["hidden_s"]) == \
        approx((dense, 0, 0, 0, 0))
    assert "expert_bytes" not in s and s["expert_read_s"] == 0.0
    assert s["step_s"] == approx(att + dense + 8.8 + 1)
    assert s["flops"] == approx(960 + 60000 + 2 * 2 * 200)
    m = PM(dense_layers=0)  # every layer MoE: no dense term
    s = ps(m=m, a2a=(0.0, 0.0), overlap=False).step(2, 100)
    assert s["dense_s"] == 0 and s["dispatch_s"] == 0


# ---- measured expert curves from runs -------------------------------------------------------------------------------
def pt(**kw):
    base = dict(kind="decode", model="m", ep=4, dtype="fp8", status="ok", batch=8, expert_ms=2.0, backend="a")
    return {**base, **kw}


def test_measured_experts_fastest_per_cell_mean_over_ranks():
    r1 = NS(hardware_id="h", run_id="r1", points=[
        pt(), pt(expert_ms=1.5, backend="b"), pt(expert_ms=1.5, backend="c"),  # fastest kept; a tie keeps the first
        pt(ep_rank=1, expert_ms=2.5, backend="b", routing="router"),
        pt(kind="collective"), pt(model="x"), pt(ep=8), pt(dtype="bf16"), pt(routing="uniform"),
        pt(status="failed"), pt(expert_ms="x"), pt(expert_ms=0), pt(expert_ms=-1.0), pt(expert_ms=None),
        pt(expert_ms=0.1, status="contended")])
    r2 = NS(hardware_id="h", run_id="r2", points=[pt(kind="prefill", batch=2, prompt_len=16, expert_ms=4.0,
                                                     backend=None)])
    other = NS(hardware_id="g", run_id="r0", points=[pt(expert_ms=0.01)])
    c = X.measured_experts([other, r1, r2], "h", "m", 4, "fp8")
    assert (c.tokens, c.seconds) == ([8.0, 32.0], [approx(2.0e-3), approx(4e-3)])
    assert c.label == "measured (run r1, r2, EP slices ep 4, 2 rank(s), ?/b, 2 token counts 8-32)"
    assert X.measured_experts([other], "h", "m", 4, "fp8") is None
    assert X.measured_experts([], "h", "m", 4, "fp8") is None
    c = X.measured_experts([NS(hardware_id="h", run_id="r3", points=[pt(status="noisy", expert_ms=3)])],
                           "h", "m", 4, "fp8")
    assert (c.tokens, c.seconds, c.label) == ([8.0], [0.003],
                                              "measured (run r3, EP slices ep 4, 1 rank(s), a, 1 token counts 8-8)")


def test_step_sends_its_tokens_through_the_all_to_all():
    # EP 16 decode, low-latency kernels: 2 sequences x 3 tokens (2 drafts) = 6 tokens x k 2 x H 10 x 1 / 2 bytes
    s = ps(ep=16, mtp_drafts=2).step(2, 100)
    assert s["dispatch_s"] == approx((3 + 2) * (LAT + 6 * 2 * 10 * 1 / 63e9))
    assert s["combine_s"] == approx((3 + 2) * (LAT + 6 * 2 * 10 * 2 / 74e9))


def test_measured_experts_filters_each_field():
    fast = dict(expert_ms=0.01)  # each filtered point would be the fastest if it counted
    bad = [pt(kind="collective", **fast), pt(model="x", **fast), pt(ep=8, **fast), pt(dtype="bf16", **fast),
           pt(routing="uniform", **fast), pt(status="failed", **fast), pt(expert_ms=0), pt(expert_ms="x")]
    good = [pt(expert_ms=0.5), pt(ep_rank=0, expert_ms=0.75, routing="router")]  # under 1 ms counts; rank 0 by default
    c = X.measured_experts([NS(hardware_id="h", run_id="r", points=bad + good)], "h", "m", 4, "fp8")
    assert (c.tokens, c.seconds) == ([8.0], [0.5e-3])
    assert c.label == "measured (run r, EP slices ep 4, 1 rank(s), a, 1 token counts 8-8)"


def test_a_faster_nic_scales_the_deepep_bandwidths(monkeypatch):
    monkeypatch.setattr(X, "INTERNODE_GBPS", 100.0)  # twice the NIC DeepEP measured on
    d, c = ps(ep=16).alltoall_s(1e6)
    assert (d, c) == (approx(LAT + 2e7 / (63 * 2e9)), approx(LAT + 4e7 / (74 * 2e9)))
    d, c = ps(ep=16, kind="prefill").alltoall_s(1e6)
    assert (d, c) == (approx(LAT + 2e7 * 0.375 / (43 * 2e9)), approx(LAT + 4e7 * 0.375 / (43 * 2e9)))


def test_step_defaults_and_mtp_only_for_decode():
    s = ps(a2a=(0.0, 0.0), cache_load_gbps=8.0).step(0, 0, 6, 2)  # no prefill context, KV or hits given: none
    assert (s["kv_bytes"], s["cache_load_s"]) == (0, 0.0)
    assert s["flops"] == approx(2 * 6 * 240 + 2 * 6 * 50 + 2 * 6 * 105 + 2 * 6 * 2 * 3 * 30)
    # a step with no decode sequences runs no MTP layer, drafts or not
    for kind in ("decode", "prefill"):
        a = ps(a2a=(1.0, 2.0), mtp_drafts=1, kind=kind).step(0, 0, 600, 200, 1, 1)
        b = ps(a2a=(1.0, 2.0), kind=kind).step(0, 0, 600, 200, 1, 1)
        keys = ("attention_s", "moe_s", "flops", "dispatch_s", "step_s")
        assert [a[k] for k in keys] == [b[k] for k in keys]
    s = ps(m=PM(moe=False, dense_layers=0), mtp_drafts=1).step(2, 100)  # dense: no all-to-all even with a draft
    assert (s["dispatch_s"], s["combine_s"], s["alltoall_s"]) == (0.0, 0.0, 0.0)
    curve = X.ExpertCurve([1.0, 4.0], [0.5, 1.5], "lbl")
    s = ps(a2a=(0.0, 0.0), experts=curve).step(6, 100)  # 3 tokens per micro-batch: inside
    assert s["experts_source"] == "lbl"
