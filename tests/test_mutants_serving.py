"""Oracles for tokenfleet.capacity.serving (`make mutate`): the tensor-parallel replica's roofline and collectives,
the measured-ratio step times, the chunked and unchunked steady state. Each layer is checked on fakes of the layer
below with round figures, so every value here is worked out by hand (written as the arithmetic, not by calling the
code under test): a model whose forward yields chosen ops, a projector whose forward is a weighted sum of its
arguments, step times in eighths of a second (exact in binary, so `<=` limits are tested at equality)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
from tokenfleet.capacity import serving as S
from tokenfleet.capacity.calibrate import Efficiency, Measured


def approx(x):
    """Tight: a mutant that moves a figure by a part in 1e9 (1e9 -> 1000000001.0) must fail."""
    return pytest.approx(x, rel=1e-12, abs=1e-18)


# ---- fakes -------------------------------------------------------------------------------------------------------
class Model:
    """What Projector reads of a ModelConfig; its forward yields `ops` and records the arguments it got."""

    def __init__(self, ops=(), moe=False, layers=3, moe_layers=2, hidden=1000, k=2):
        self.ops_, self.calls = list(ops), []
        self.hidden_size, self.num_layers = hidden, layers
        self.moe = NS(experts_per_token=k) if moe else None
        self.num_moe_layers = moe_layers if moe else 0

    def kv_bytes_per_token(self, db):
        return 10 * db

    def kv_replication(self, tp):
        return 1.5 * tp

    def forward_ops(self, *args):
        self.calls.append(args)
        yield from self.ops_


def hw(gbps=100.0, ic_type="NVLink", fp8=True, hid="toy"):
    """1000 TFLOP/s bf16 (fp8 twice that), 1000 GB/s: peak 1e15, bandwidth 1e12 bytes/s."""
    peaks = {"bf16": 1e15, "fp8": 2e15 if fp8 else None}
    ic = NS(type=ic_type, per_direction_gbps=gbps) if ic_type else None
    return NS(id=hid, peak=lambda d: peaks.get(d), bandwidth_bytes_per_s=1e12, interconnect=ic)


EFF = Efficiency(compute=0.5, memory=0.25, overhead_ms=2.0)


def proj(tp=1, model=None, **kw):
    kw.setdefault("hw", hw())
    return S.Projector(model or Model(), tp=tp, eff=EFF, **kw)


# ---- Projector: figures and labels ---------------------------------------------------------------------------------
def test_constants():
    assert (S.ALLREDUCE_LATENCY_US, S.INTERNODE_GBPS, S.PCIE_GBPS, S.ACT_BYTES, S.GPUS_PER_NODE, S.B_SLO_MAX) == \
        (10.0, 50.0, 64.0, 2, 8, 65536)


def test_defaults_and_per_replica_figures():
    p = S.Projector(Model(), hw())
    assert (p.dtype, p.tp, p.kv_dtype, p.notes, p.allreduce) == ("bf16", 1, "bf16", [], None)
    assert p.eff == Efficiency()
    p = proj(tp=4, dtype="fp8", kv_dtype="fp8")
    assert p.wb == 1
    assert p.kvb == 10 * 1 * 1.5 * 4  # kv bytes per token at 1 byte, times the replication at tp 4
    assert p.peak == 2e15 * 4 * 0.5
    assert p.bw == 1e12 * 4 * 0.25
    assert proj().kvb == 10 * 2 * 1.5 and proj().wb == 2


def test_no_fp8_peak_falls_back_to_bf16_with_a_note():
    p = proj(tp=2, dtype="fp8", hw=hw(fp8=False, hid="a100"))
    assert p.peak == 1e15 * 2 * 0.5
    assert p.notes == ["a100 has no fp8 peak: fp8 weights, bf16 compute"]


def test_links_one_gpu():
    p = proj(tp=1)
    assert (p.scaleup, p.link, p.allreduce_source, p.ep, p.alltoall_source, p.notes) == \
        (100.0, 100.0, None, False, None, [])
    p = proj(tp=1, hw=hw(ic_type=None))
    assert (p.scaleup, p.link, p.allreduce_source, p.notes) == (None, None, None, [])


def test_links_in_node_datasheet():
    p = proj(tp=8, model=Model(moe=True))  # 8 GPUs: still one node, not expert-parallel
    assert (p.scaleup, p.link, p.ep, p.alltoall_source, p.notes) == (100.0, 100.0, False, None, [])
    assert p.allreduce_source == "datasheet NVLink 100 GB/s; ring, 10 us per call assumed"


def test_two_gpus_without_a_figure_assume_pcie():
    p = proj(tp=2, hw=hw(hid="x", ic_type=None))
    assert (p.scaleup, p.link) == (64.0, 64.0)
    assert p.notes == ["all-reduce at assumed PCIe Gen5 64 GB/s (x has no interconnect figure)"]


@pytest.mark.parametrize("ic", [dict(ic_type=None), dict(gbps=None)])
def test_links_without_a_figure_assume_pcie(ic):
    p = proj(tp=4, hw=hw(hid="x", **ic))
    assert (p.scaleup, p.link) == (64.0, 64.0)
    assert p.allreduce_source == \
        "assumed PCIe Gen5 64 GB/s (x has no interconnect figure); ring, 10 us per call assumed"
    assert p.notes == ["all-reduce at assumed PCIe Gen5 64 GB/s (x has no interconnect figure)"]


def test_links_across_nodes():
    p = proj(tp=16, model=Model(moe=True))
    assert (p.scaleup, p.link, p.ep) == (100.0, 50.0, True)
    assert p.allreduce_source == "assumed inter-node 50 GB/s per GPU (tp 16 spans nodes); ring, 10 us per call assumed"
    assert p.alltoall_source == "assumed: expert-parallel all-to-all at 50 GB/s inter-node, 100 GB/s in-node"
    assert p.notes == ["all-reduce at assumed inter-node 50 GB/s per GPU (tp 16 spans nodes)",
                       "MoE on 16 GPUs spans nodes: expert-parallel all-to-all at 50 GB/s inter-node, "
                       "100 GB/s in-node (assumed)"]
    assert proj(tp=16, hw=hw(gbps=30.0)).link == 30.0  # a scale-up link slower than the NIC stays the limit
    p = proj(tp=16, hw=hw(ic_type=None), model=Model(moe=True))
    assert (p.scaleup, p.link) == (None, 50.0)
    assert p.alltoall_source == "assumed: expert-parallel all-to-all at 50 GB/s inter-node, 64 GB/s in-node"
    p = proj(tp=16)  # dense across nodes: no all-to-all
    assert (p.ep, p.alltoall_source) == (False, None)
    assert p.notes == ["all-reduce at assumed inter-node 50 GB/s per GPU (tp 16 spans nodes)"]


def test_measured_allreduce_names_its_run_and_adds_no_note():
    p = proj(tp=16, allreduce=(lambda b: b / 1000, "run r1"))
    assert (p.allreduce_source, p.notes) == ("run r1", [])
    assert p.one_allreduce_s(50) == 50 * 1000 * 2 / 1000 * 1e-3  # message bytes -> ms off the curve -> s


# ---- Projector: times ----------------------------------------------------------------------------------------------
def test_forward_is_the_roofline_per_op_plus_overhead():
    # peak 1e15 * 0.5 = 5e14 FLOP/s, bandwidth 1e12 * 0.25 = 2.5e11 B/s at tp 1
    m = Model(ops=[("a", 2e15, 5e10), ("b", 5e13, 1e12), ("c", 0.0, 0.0)])
    p = proj(model=m)
    # a: max(4 s, 0.2 s); b: max(0.1 s, 4 s); + 2 ms
    assert p.forward_s(7, 8, 9, 10) == approx(4 + 4 + 2e-3)
    assert m.calls[-1] == (7, 8, 9, 10, 2, 30.0, 0.0)  # tokens, ctx, kv read, logits, weight bytes, kv bytes, absorbed
    p.forward_s(7, 8, 9, 10, 0.25)
    assert m.calls[-1][-1] == 0.25
    assert list(p.ops(1, 2, 3, 4)) == m.ops_ and m.calls[-1] == (1, 2, 3, 4, 2, 30.0, 0.0)
    assert proj(model=Model()).forward_s(1, 1, 1, 1) == approx(2e-3)  # no ops: the overhead alone


def test_ring_allreduce():
    p = proj(tp=4)  # 100 GB/s: 10 us + 2*3/4 * (50 tokens * 1000 * 2 bytes) / 1e11
    assert p.one_allreduce_s(50) == approx(10e-6 + 1.5 * 1e5 / 1e11)
    assert proj(tp=2).one_allreduce_s(50) == approx(10e-6 + 1.0 * 1e5 / 1e11)


def test_alltoall_the_slower_of_nic_and_scaleup():
    m = Model(moe=True, k=2, hidden=1000)
    # tp 16: each rank sends 160/16 tokens * 2 copies * 1000 * 2 bytes = 40000 bytes
    p = proj(tp=16, model=m)
    off, inn = 40000 * 8 / 16 / 50e9, 40000 * 7 / 16 / 100e9  # NIC binds
    assert off > inn and p.one_alltoall_s(160) == approx(10e-6 + off)
    p = proj(tp=16, model=m, hw=hw(gbps=10.0))  # a slow scale-up link binds
    off, inn = 40000 * 8 / 16 / 50e9, 40000 * 7 / 16 / 10e9
    assert inn > off and p.one_alltoall_s(160) == approx(10e-6 + inn)
    p = proj(tp=9, model=m, hw=hw(ic_type=None))  # no figure: PCIe in-node; 90/9*2*1000*2 = 40000 bytes
    off, inn = 40000 * 1 / 9 / 50e9, 40000 * 7 / 9 / 64e9
    assert inn > off and p.one_alltoall_s(90) == approx(10e-6 + inn)


def test_collectives_of_one_forward():
    assert proj(tp=1, model=Model(moe=True)).allreduce_s(100) == 0.0
    p = proj(tp=4, model=Model(layers=3))
    assert p.allreduce_s(50) == approx(2 * 3 * (10e-6 + 1.5 * 1e5 / 1e11))
    p = proj(tp=16, model=Model(moe=True, layers=3, moe_layers=2))
    ar = 10e-6 + 2 * 15 / 16 * (160 * 1000 * 2) / 50e9
    a2a = 10e-6 + 40000 * 8 / 16 / 50e9
    assert p.allreduce_s(160) == approx((2 * 3 - 2) * ar + 2 * 2 * a2a)


def test_decode_and_prefill_forward_arguments():
    m = Model(ops=[("a", 5e14, 0.0)])  # 1 s of compute at tp 1
    p = proj(model=m)
    assert p.t_dec(4, 100) == approx(1 + 2e-3)
    assert m.calls[-1] == (4, 100, 400, 4, 2, 30.0, 1.0)
    assert p.t_pre(64) == approx(1 + 2e-3)
    assert m.calls[-1] == (64, 32.0, 64.0, 1, 2, 30.0, 0.0)
    p.t_pre(64, cached=10, batch=3)
    assert m.calls[-1] == (192, 42.0, 3 * 74.0, 3, 2, 30.0, 0.0)
    m = Model(ops=[("a", 5e14 * 4, 0.0)])
    p = proj(tp=4, model=m)  # + 2 L all-reduces of the tokens
    assert p.t_dec(50, 10) == approx(1 + 2e-3 + 6 * (10e-6 + 1.5 * 1e5 / 1e11))
    assert p.t_pre(25, batch=2) == approx(1 + 2e-3 + 6 * (10e-6 + 1.5 * 1e5 / 1e11))


def test_mixed_args():
    # 4 decode tokens at 100 + 8 prefill tokens at mean context 30, prompts of 16 new tokens
    assert S.mixed_args(4, 100, 8, 30, 16) == (12, (400 + 240) / 12, 400 + 1.0 * 30, 4, 400 / 640)
    # a chunk of two prompts' worth reads both prompts' KV
    assert S.mixed_args(4, 100, 32, 30, 16) == (36, (400 + 960) / 36, 400 + 2.0 * 30, 4, 400 / 1360)
    assert S.mixed_args(4, 100, 0, 30, 16) == (4, 100.0, 400, 4, 1.0)
    assert S.mixed_args(0, 100, 0, 30, 16) == (0, 0.0, 0, 0, 0.0)
    assert S.mixed_args(0, 100, 8, 30, 16) == (8, 30.0, 30.0, 0, 0.0)


def test_largest():
    asked = []

    def ok(x):
        asked.append(x)
        return x <= 7

    assert S.largest(ok, 100) == 7 and 0 not in asked
    assert S.largest(lambda x: x <= 7, 7) == 7
    assert S.largest(lambda x: x <= 7, 8) == 7
    assert S.largest(lambda x: False, 100) == 0
    assert S.largest(lambda x: True, 100) == 100
    assert S.largest(lambda x: True, 1) == 1
    assert S.largest(lambda x: True, 0) == 0


# ---- Steps: a projector whose forward weighs each argument differently -----------------------------------------------
class Proj:
    def __init__(self, tp=1):
        self.tp, self.calls = tp, []

    def forward_s(self, tokens, ctx, kv, logits, absorbed=0.0):
        self.calls.append((tokens, ctx, kv, logits, absorbed))
        return tokens + ctx / 10 + kv / 100 + logits / 1000 + absorbed / 10000

    def allreduce_s(self, tokens):
        return tokens / 50 if self.tp > 1 else 0.0


def fwd(tokens, ctx, kv, logits, absorbed=0.0):
    return tokens + ctx / 10 + kv / 100 + logits / 1000 + absorbed / 10000


def meas(decode=None, prefill=None, shard=False):
    return Measured(backend="b", runs=["r"], decode=decode or {}, prefill=prefill or {}, shard=shard)


def test_projected_steps():
    p = Proj(tp=2)
    s = S.Steps(p)
    assert (s.proj, s.meas, s.whole, s.dec, s.pre) == (p, None, False, None, None)
    d = fwd(2, 100, 200, 2, 1.0)  # 14.0021
    assert s.decode(2, 100) == approx(d + 2 / 50)
    # a step with a chunk of 8 at context 30 from prompts of 16: the chunk's extra forward and all-reduce
    mixed = fwd(10, (200 + 240) / 10, 200 + 30, 2, 200 / 440)
    assert s.step(2, 100, 8, 30, 16) == approx(d + 2 / 50 + (mixed - d) + 8 / 50)
    assert s.step(2, 100, 0, 30, 16) == approx(d + 2 / 50)
    assert not s.extrapolated(2, 100)
    # a negative difference (a fake forward that shrinks) is held at 0, forward and collective alike
    s.proj.forward_s = lambda *a: 5.0 if a[0] == 10 else 7.0
    s.proj.allreduce_s = lambda t: 1.0 if t == 10 else 3.0
    assert s.step(2, 100, 8, 30, 16) == approx(7 + 3)


def test_ttft_chunks():
    p = Proj(tp=1)
    s = S.Steps(p)
    # 10 new tokens after 4 cached in chunks of 4: 4 (ctx 4..8), 4 (8..12), 2 (12..14)
    t = fwd(4, 4 + 2, 8, 1) + fwd(4, 8 + 2, 12, 1) + fwd(2, 12 + 1, 14, 1)
    assert s.ttft(10, 4, 4) == approx(t)
    assert p.calls[-3:] == [(4, 6.0, 8, 1, 0.0), (4, 10.0, 12, 1, 0.0), (2, 13.0, 14, 1, 0.0)]
    assert s.ttft(10, 4, 10) == approx(fwd(10, 9, 14, 1))
    assert s.ttft(0, 4, 10) == 0.0
    s2 = S.Steps(Proj(tp=2))
    assert s2.ttft(10, 0, 4) == approx(fwd(4, 2, 4, 1) + fwd(4, 6, 8, 1) + fwd(2, 9, 10, 1) + 10 / 50)


def test_measured_ratios_tp1_and_shard_scale_the_forward_alone():
    for tp, shard in ((1, False), (2, True)):
        p = Proj(tp=tp)
        s = S.Steps(p, meas(decode={(2, 100): 3 * fwd(2, 100, 200, 2, 1.0)},
                            prefill={(1, 16): 2 * fwd(16, 8, 16, 1)}, shard=shard))
        assert not s.whole
        comm = 2 / 50 if tp > 1 else 0.0
        assert s.decode(2, 100) == approx(3 * fwd(2, 100, 200, 2, 1.0) + comm)
        assert s.decode(4, 100) == approx(3 * fwd(4, 100, 400, 4, 1.0) + (4 / 50 if tp > 1 else 0.0))
        assert s.ttft(16, 0, 16) == approx(2 * fwd(16, 8, 16, 1) + (16 / 50 if tp > 1 else 0.0))
        d = fwd(2, 100, 200, 2, 1.0)
        mixed = fwd(10, 44, 230, 2, 200 / 440)
        chunk_comm = 8 / 50 if tp > 1 else 0.0
        assert s.step(2, 100, 8, 30, 16) == approx(3 * d + comm + 2 * (mixed - d) + chunk_comm)


def test_measured_ratios_of_a_tp_replica_scale_its_collectives_too():
    p = Proj(tp=2)
    dec_t, pre_t = 3 * (fwd(2, 100, 200, 2, 1.0) + 2 / 50), 2 * (fwd(16, 8, 16, 1) + 16 / 50)
    s = S.Steps(p, meas(decode={(2, 100): dec_t}, prefill={(1, 16): pre_t}))
    assert s.whole
    assert s.decode(2, 100) == approx(dec_t)
    assert s.decode(4, 100) == approx(3 * (fwd(4, 100, 400, 4, 1.0) + 4 / 50))
    assert s.ttft(16, 0, 16) == approx(pre_t)
    d = fwd(2, 100, 200, 2, 1.0)
    mixed = fwd(10, 44, 230, 2, 200 / 440)
    assert s.step(2, 100, 8, 30, 16) == approx(dec_t + 2 * ((mixed - d) + 8 / 50))


def test_ratio_grids_by_batch_context_and_prompt_length():
    p = Proj(tp=1)
    dec = {(1, 100): 2 * fwd(1, 100, 100, 1, 1.0), (4, 100): 4 * fwd(4, 100, 400, 4, 1.0),
           (1, 400): 2 * fwd(1, 400, 400, 1, 1.0), (4, 400): 4 * fwd(4, 400, 1600, 4, 1.0)}
    # prefill ratios by (prompts, prompt length): 2 at 1 token, 4 at 4 tokens, 6 for 2 prompts of 4 ((2, 1) takes the
    # nearest sample, (1, 1)'s 2): 3 at (1, 2), 4 at (2, 2)
    pre = {(1, 1): 2 * fwd(1, 0.5, 1, 1), (1, 4): 4 * fwd(4, 2, 4, 1), (2, 4): 6 * fwd(8, 2, 8, 2)}
    s = S.Steps(p, meas(decode=dec, prefill=pre))
    assert s.dec(1, 100) == approx(2) and s.dec(4, 400) == approx(4)
    assert s.dec(2, 200) == approx(3)  # halfway on log2 batch
    assert s.pre(1, 1) == approx(2) and s.pre(1, 4) == approx(4) and s.pre(1, 2) == approx(3)
    assert s.pre(2, 4) == approx(6) and s.pre(2, 2) == approx(4)
    assert s.decode(2, 100) == approx(3 * fwd(2, 100, 200, 2, 1.0))
    # the chunk's ratio at its own length (as one prompt), at least 1 token
    d = fwd(2, 100, 200, 2, 1.0)
    mixed = fwd(4, (200 + 600) / 4, 200 + 300, 2, 200 / 800)
    assert s.step(2, 100, 2, 300, 16) == approx(3 * d + 3 * (mixed - d))
    mixed = fwd(2.5, (200 + 150) / 2.5, 200 + 300, 2, 200 / 350)
    assert s.step(2, 100, 0.5, 300, 16) == approx(3 * d + 2 * (mixed - d))
    assert s.ttft(4, 0, 2) == approx(3 * fwd(2, 1, 2, 1) + 3 * fwd(2, 3, 4, 1))
    assert not s.extrapolated(2, 200) and not s.extrapolated(4, 400) and not s.extrapolated(1, 100)
    assert s.extrapolated(8, 200) and s.extrapolated(2, 50) and s.extrapolated(2, 800) and s.extrapolated(0.5, 200)


def test_a_run_with_one_kind_leaves_the_other_projected():
    p = Proj(tp=1)
    s = S.Steps(p, meas(prefill={(1, 4): 3 * fwd(4, 2, 4, 1)}))
    assert s.dec is None and s.decode(2, 100) == approx(fwd(2, 100, 200, 2, 1.0))
    assert not s.extrapolated(1000, 1000)
    s = S.Steps(p, meas(decode={(2, 100): 5 * fwd(2, 100, 200, 2, 1.0)}))
    assert s.pre is None and s.ttft(4, 0, 4) == approx(fwd(4, 2, 4, 1))


# ---- serve: a Steps whose step is 1/8 s per token, + 1/2 s when it carries prefill -----------------------------------
class FakeSteps:
    def __init__(self, ttft=0.25):
        self.calls, self.ttft_calls, self.ttft_s = [], [], ttft

    def step(self, b, C, chunk, chunk_ctx, prompt):
        self.calls.append((b, C, chunk, chunk_ctx, prompt))
        return 0.125 * (b + chunk) + (0.5 if chunk > 0 else 0.0)

    def decode(self, b, C):
        return 0.125 * b + C / 1e6

    def ttft(self, new, cached, budget):
        self.ttft_calls.append((new, cached, budget))
        return self.ttft_s


def serve(steps=None, i=300, o=100, h=0.0, tpot=6500, ttft=250, b_mem=20, cap=30, budget=100, chunked=True):
    return S.serve(steps or FakeSteps(), i, o, h, tpot, ttft, b_mem, cap, budget, chunked)


def test_serve_chunked_at_the_tpot_limit():
    st = FakeSteps()
    # 300 new tokens over 100 outputs: 3 prefill tokens per sequence per step; T(b) = 125 * 4b + 500 ms
    r = serve(st)
    assert r["b_slo"] == 12 and r["batch"] == 12 and r["batch_limit"] == "slo"  # 6500 ms at 12, equality counts
    assert r["b_budget"] == 25  # floor(100 / (1 + 3))
    assert r["step_s"] == 0.125 * 48 + 0.5 and r["tpot_at_1_s"] == 0.125 * 4 + 0.5
    assert r["decode_step_s"] == approx(0.125 * 12 + 350 / 1e6)
    assert (r["new_tokens"], r["context"], r["prefill_tokens_per_step"]) == (300.0, 350.0, 36.0)
    assert r["output_per_s"] == approx(12 / 6.5)
    assert r["total_per_s"] == approx(12 / 6.5 * 400 / 100)
    assert (r["tpot_ok"], r["ttft_s"], r["ttft_ok"]) == (True, 0.25, True)  # 250 ms at a 250 ms limit
    assert st.calls[-1] == (1, 350.0, 3.0, 150.0, 300.0)  # t(1) last
    assert (12, 350.0, 36.0, 150.0, 300.0) in st.calls
    assert st.ttft_calls == [(300.0, 0.0, 100)]
    assert set(r) == {"batch", "batch_limit", "b_slo", "b_budget", "step_s", "decode_step_s", "ttft_s", "new_tokens",
                      "context", "prefill_tokens_per_step", "output_per_s", "total_per_s", "tpot_ok", "ttft_ok",
                      "tpot_at_1_s"}
    assert serve(tpot=6499)["b_slo"] == 11
    st = FakeSteps()
    assert S.serve(st, 300, 100, 0.0, 6500, 250, 20, 30, 100) == r  # chunked by default
    assert st.calls[-1] == (1, 350.0, 3.0, 150.0, 300.0)
    assert serve(ttft=249.9)["ttft_ok"] is False


def test_serve_prefix_hits_and_limits():
    st = FakeSteps()
    r = serve(st, h=0.5, tpot=1e9)  # 150 new after 150 cached: 1.5 per step; budget floor(100/2.5) = 40
    assert (r["new_tokens"], r["b_budget"], r["batch"], r["batch_limit"]) == (150.0, 40, 20, "memory")
    assert r["b_slo"] == S.B_SLO_MAX
    assert st.calls[-2] == (20, 350.0, 30.0, 225.0, 150.0) and st.ttft_calls == [(150.0, 150.0, 100)]
    r = serve(h=1.0, tpot=1e9, b_mem=100, cap=100)  # all cached: still one new token a prompt
    assert (r["new_tokens"], r["b_budget"], r["batch_limit"]) == (1.0, 99, "budget")  # floor(100 / 1.01)
    r = serve(tpot=1e9, b_mem=40, cap=30)
    assert (r["batch"], r["batch_limit"]) == (25, "budget")
    r = serve(tpot=1e9, b_mem=40, cap=24)
    assert (r["batch"], r["batch_limit"]) == (24, "cap")
    r = serve(b_mem=12)  # ties go to memory, then slo, cap, budget
    assert r["batch_limit"] == "memory"
    assert serve(cap=12)["batch_limit"] == "slo"
    assert serve(tpot=1e9, b_mem=30, cap=25)["batch_limit"] == "cap"
    assert serve(budget=3)["b_budget"] == 1  # floor(3/4) = 0, held at 1


def test_serve_missing_tpot_at_batch_one():
    r = serve(tpot=999)  # T(1) = 1 s
    assert (r["b_slo"], r["batch"], r["batch_limit"], r["tpot_ok"]) == (0, 1, "slo", False)
    assert serve(tpot=1000)["tpot_ok"] is True


def test_serve_unchunked_puts_whole_prompts_in_a_fraction_of_the_steps():
    st = FakeSteps()
    # f = b/100 of the steps carry b*3/f = 300 tokens (one prompt), the rest none:
    # T(b) = (1-f)*125b + f*(125(b+300) + 500) ms = 125b + 375b + 5b = 505 b ms
    r = serve(st, tpot=505 * 12 + 1e-3, chunked=False)
    assert r["b_slo"] == 12 and r["step_s"] == approx(0.505 * 12)
    assert (12, 350.0, 0.0, 150.0, 300.0) in st.calls and (12, 350.0, 300.0, 150.0, 300.0) in st.calls
    assert st.ttft_calls == [(300.0, 0.0, 300)]  # the whole prompt in one step: the budget raised to it
    r = serve(FakeSteps(), tpot=1e9, b_mem=200, cap=200, budget=1000, o=10, chunked=False)
    # more sequences than output steps: every step prefills (f = 1); 30 per step each, budget floor(1000/31) = 32
    assert (r["batch"], r["batch_limit"]) == (32, "budget")
    assert r["step_s"] == approx(0.125 * (32 + 960) + 0.5)
    st = FakeSteps()
    serve(st, budget=500, chunked=False)
    assert st.ttft_calls == [(300.0, 0.0, 500)]
    st = FakeSteps()
    serve(st, i=301, h=0.5, chunked=False)  # 150.5 new: ceil to 151
    assert st.ttft_calls == [(150.5, 150.5, 151)]
