"""Kernel ops against float64 references, plus the references against independent formulas.

Without CUDA the Triton kernels run under Triton's interpreter (slow, one program at a time), so shapes
here are tiny and deliberately odd: no size is a multiple of any block. `TestGPU` repeats each op at
model-sized shapes in every dtype and is skipped without CUDA.

On a GPU every test but one per op runs each autotuned kernel with one pinned config (`kernels._triton.
pinned_configs`), so a new shape compiles one config instead of compiling and timing the whole space;
`test_every_autotune_config` compiles and checks each config of each op's space on the device.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenfleet import kernels
from tokenfleet.kernels import REGISTRY, registry, rel_error
from tokenfleet.kernels._triton import INTERPRET, pinned_configs
from tokenfleet.kernels.attention_decode import FP8, attention_decode, attention_decode_ref
from tokenfleet.kernels.attention_prefill import attention_prefill, attention_prefill_ref
from tokenfleet.kernels.gemm import gemm, gemm_ref
from tokenfleet.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from tokenfleet.kernels.rope import rope, rope_ref
from tokenfleet.kernels.silu_mul import silu_mul, silu_mul_ref
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Interpreted kernels take CPU tensors; compiled ones need the GPU.
DEVICE = "cpu" if INTERPRET else "cuda"
HAS_CUDA = torch.cuda.is_available()
DOT_OPS = {"gemm", "attention_prefill", "attention_decode"}


@pytest.fixture(autouse=True)
def _one_config():
    with pinned_configs():
        yield


# Small odd shapes per op: the shapes the CPU suite runs (several per op, exercising masks and edge cases).
SMALL_SHAPES = {
    "gemm": [
        {"m": 1, "n": 45, "k": 70},  # decode row
        {"m": 5, "n": 33, "k": 300},  # skinny, K split across programs
        {"m": 70, "n": 37, "k": 19},  # tall M, K smaller than one block
    ],
    "rmsnorm": [
        {"rows": 7, "hidden": 300, "residual": False},
        {"rows": 5, "hidden": 33, "residual": True},
        {"rows": 1, "hidden": 1, "residual": False},
    ],
    "rope": [
        {"tokens": 7, "q_heads": 6, "kv_heads": 2, "head_dim": 32},
        {"tokens": 1, "q_heads": 3, "kv_heads": 3, "head_dim": 16},
    ],
    "silu_mul": [
        {"rows": 7, "n": 301},
        {"rows": 1, "n": 1},
    ],
    "attention_prefill": [
        {"batch": 2, "q_heads": 4, "kv_heads": 2, "seq": 37, "head_dim": 32, "causal": True},
        {"batch": 1, "q_heads": 3, "kv_heads": 1, "seq": 70, "head_dim": 16, "causal": True},
        {"batch": 1, "q_heads": 2, "kv_heads": 2, "seq": 19, "head_dim": 64, "causal": False},
        {"batch": 1, "q_heads": 2, "kv_heads": 1, "seq": 1, "head_dim": 16, "causal": True},
    ],
    "attention_decode": [
        {"batch": 3, "q_heads": 8, "kv_heads": 2, "context": [1, 37, 70], "max_context": 70, "head_dim": 32},
        {"batch": 2, "q_heads": 2, "kv_heads": 2, "context": 19, "head_dim": 64},
        {"batch": 4, "q_heads": 4, "kv_heads": 1, "max_context": 45, "head_dim": 16},  # random lengths
    ],
}


def _runs_as(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a case's kernel runs in. Elementwise ops in bf16 are right under the interpreter (measured); its
    bf16 tl.dot is not, so there a dot op's bf16 case runs the same kernel on the same bf16-drawn values cast to
    fp16 (exact: N(0, 1) draws are inside fp16's range, bf16's 8 bits inside its 11), held to fp16's tolerance. On
    a GPU bf16 runs as bf16."""
    return torch.float16 if INTERPRET and dtype == torch.bfloat16 and name in DOT_OPS else dtype


def _to64(args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _check_op(name: str, shape: dict, dtype: torch.dtype, device: str = DEVICE, seed: int = 0, **kw) -> None:
    op = REGISTRY[name]
    args = op.make_inputs(shape, dtype, device, seed)
    if (run := _runs_as(name, dtype)) != dtype:
        exact = tuple(a.to(run) if torch.is_tensor(a) and a.dtype == dtype else a for a in args)
        assert all(torch.equal(a.to(dtype), b) for a, b in zip(exact, args, strict=True) if torch.is_tensor(b)
                   and b.dtype == dtype)
        args, dtype = exact, run
    outs = op.outputs(op.triton(*args, **kw))
    refs = op.outputs(op.reference(*_to64(args)))
    assert len(outs) == len(refs)
    for out, ref in zip(outs, refs, strict=True):
        assert out.dtype == dtype and out.shape == ref.shape
        err = rel_error(out, ref)
        assert err <= op.tolerance(dtype), f"{name} {shape} {dtype}: rel error {err:.2e} > {op.tolerance(dtype):.0e}"


# --------------------------------------------------------------------------------------------------
# Every op, every small shape, against its float64 reference.

@pytest.mark.parametrize(
    "name,shape,dtype",
    [pytest.param(n, s, d, id=f"{n}-{i}-{str(d)[6:]}" + ("-as-float16" if _runs_as(n, d) != d else ""))
     for n, shapes in SMALL_SHAPES.items() for i, s in enumerate(shapes)
     for d in (torch.float32, torch.float16, torch.bfloat16)],
)
def test_op_matches_float64_reference(name, shape, dtype):
    _check_op(name, shape, dtype)


# --------------------------------------------------------------------------------------------------
# Every output element is written: pass NaN-filled `out=` buffers, expect no NaN left and the same values.

@pytest.mark.parametrize("name", list(SMALL_SHAPES))
def test_every_output_element_written(name):
    op = REGISTRY[name]
    args = op.make_inputs(SMALL_SHAPES[name][0], torch.float16, DEVICE, seed=1)
    expected = op.outputs(op.triton(*args))
    poisoned = tuple(torch.full_like(e, float("nan")) for e in expected)
    result = op.triton(*args, out=poisoned[0] if len(poisoned) == 1 else poisoned)
    for got, buf, exp in zip(op.outputs(result), poisoned, expected, strict=True):
        assert got.data_ptr() == buf.data_ptr(), "launcher must write into out="
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, exp, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Paths and layouts the default shapes do not reach.

def test_gemm_forced_split_k_and_batched_x():
    x = torch.randn(2, 3, 200, device=DEVICE, dtype=torch.float16)
    w = (torch.randn(29, 200, device=DEVICE) / 200**0.5).to(torch.float16)
    ref = gemm_ref(x.double(), w.double())
    for split_k in (1, 3, 7):  # 7 asks for more splits than K has aligned chunks
        y = gemm(x, w, split_k=split_k)
        assert y.shape == (2, 3, 29)
        assert rel_error(y, ref) <= REGISTRY["gemm"].tolerance(torch.float16)


def test_gemm_strided_inputs():
    big = torch.randn(40, 2 * 67, device=DEVICE)
    x = big[::2, :67]  # strided rows, a view
    w = torch.randn(67, 31, device=DEVICE).T  # [31, 67] with column-major strides
    assert rel_error(gemm(x, w), gemm_ref(x.double(), w.double())) <= 2e-3


def test_rmsnorm_strided_rows_and_fp32_weight():
    x = torch.randn(9, 2 * 130, device=DEVICE, dtype=torch.float16)[:, :130]
    w = 1 + 0.1 * torch.randn(130, device=DEVICE)
    y = rmsnorm(x, w, 1e-5)
    assert y.is_contiguous() and y.dtype == torch.float16
    assert rel_error(y, rmsnorm_ref(x.double(), w.double(), 1e-5)) <= 1e-3


def test_rope_fused_qkv_views_and_int64_positions():
    t, hq, hkv, d = 5, 4, 2, 16
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    positions = torch.tensor([0, 3, 17, 1000, 131071], device=DEVICE, dtype=torch.int64)
    q_out, k_out = rope(q, k, positions, 10000.0)
    q_ref, k_ref = rope_ref(q.double(), k.double(), positions, 10000.0)
    assert rel_error(q_out, q_ref) <= 1e-5 and rel_error(k_out, k_ref) <= 1e-5
    assert torch.equal(q_out[0], q[0])  # position 0 is the identity
    assert q.data_ptr() == qkv.data_ptr() and not torch.equal(q_out, q)  # new tensors, input untouched


def test_silu_mul_halves_of_fused_gate_up():
    gate_up = torch.randn(6, 2 * 77, device=DEVICE, dtype=torch.float16)
    gate, up = gate_up[:, :77], gate_up[:, 77:]
    assert rel_error(silu_mul(gate, up), silu_mul_ref(gate.double(), up.double())) <= 1e-3


def test_attention_prefill_strided_bshd_layout():
    # Models often hold q/k/v as [B, S, H, D] and transpose; no copy should be needed.
    q = torch.randn(1, 21, 4, 32, device=DEVICE).transpose(1, 2)
    k = torch.randn(1, 21, 2, 32, device=DEVICE).transpose(1, 2)
    v = torch.randn(1, 21, 2, 32, device=DEVICE).transpose(1, 2)
    o = attention_prefill(q, k, v, causal=True)
    assert rel_error(o, attention_prefill_ref(q.double(), k.double(), v.double())) <= 2e-3


# A forced chunk must be a multiple of the kernel's alignment: 16 interpreted, 128 compiled (every BLOCK_N of the
# GPU space divides it). Lengths scale with it, so each chunk size splits the longer sequences and cuts them mid-chunk.
@pytest.mark.parametrize("chunks", [1, 2, 5], ids=lambda c: f"{c}x_align")
def test_attention_decode_splits_and_never_reads_past_length(chunks):
    from tokenfleet.kernels.attention_decode import _CHUNK_ALIGN

    a = _CHUNK_ALIGN // 16  # 1 interpreted: chunks 16, 32, 80 over lengths 5, 33, 50
    lengths, s_max = [5 * a, 33 * a, 50 * a], 50 * a
    q, k, v, lens = REGISTRY["attention_decode"].make_inputs(
        {"batch": 3, "q_heads": 4, "kv_heads": 2, "context": lengths, "max_context": s_max, "head_dim": 32},
        torch.float16, DEVICE, seed=2)
    chunk_size = chunks * _CHUNK_ALIGN
    ref = attention_decode_ref(q.double(), k.double(), v.double(), lens)
    # NaN after each sequence's length: any read of it would poison the output.
    valid = torch.arange(s_max, device=DEVICE)[None, :] < lens[:, None]
    k_nan = k.masked_fill(~valid[:, None, :, None], float("nan"))
    v_nan = v.masked_fill(~valid[:, None, :, None], float("nan"))
    o = attention_decode(q, k_nan, v_nan, lens, chunk_size=chunk_size)
    assert rel_error(o, ref) <= REGISTRY["attention_decode"].tolerance(torch.float16)


def test_attention_decode_length_one_returns_v0():
    q, k, v, _ = REGISTRY["attention_decode"].make_inputs(
        {"batch": 2, "q_heads": 4, "kv_heads": 4, "context": 9, "head_dim": 16}, torch.float32, DEVICE, seed=3)
    o = attention_decode(q, k, v, torch.ones(2, dtype=torch.int32, device=DEVICE))
    # p = 1 exactly, so o = v0 but for the p @ v dot's input rounding: none under the interpreter (exact fp32 dot);
    # on sm80+ an fp32 tl.dot runs as TF32, v rounded to a 10-bit mantissa (relative error below 2^-10; an H200
    # measured 8.5e-4). Reading any other position is off by O(1).
    rtol = 1e-6 if INTERPRET else 2.0**-10
    torch.testing.assert_close(o, v[:, :, 0, :], rtol=rtol, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The GPU autotune spaces, one config at a time: under the interpreter, the block sizes a real GPU picks
# (BLOCK_M 256, BLOCK_K 256, split-K, BLOCK_N 128 ...) meet the same masks and edges as the tiny CPU ones; on a
# GPU, every config the launcher's pruning keeps for the shape is compiled and checked (the one full-space test
# per op: elsewhere the configs are pinned).

GPU_CONFIG_SHAPES = {
    "gemm": [{"m": 70, "n": 270, "k": 300}, {"m": 5, "n": 100, "k": 1100}],
    "attention_prefill": [
        {"batch": 1, "q_heads": 2, "kv_heads": 1, "seq": 150, "head_dim": 64, "causal": True},
        {"batch": 1, "q_heads": 1, "kv_heads": 1, "seq": 130, "head_dim": 128, "causal": False},
    ],
    "attention_decode": [
        {"batch": 3, "q_heads": 8, "kv_heads": 2, "context": [1, 200, 300], "max_context": 300, "head_dim": 128},
    ],
}


def _gpu_space(name: str):
    from tokenfleet.kernels import attention_decode as ad
    from tokenfleet.kernels import attention_prefill as ap
    from tokenfleet.kernels import gemm as gm

    return {
        "gemm": (gm._gemm_kernel, gm._gemm_configs(interpret=False)),
        "attention_prefill": (ap._attention_prefill_kernel, ap._attention_configs(interpret=False)),
        "attention_decode": (ad._attention_decode_kernel, ad._decode_configs(interpret=False)),
    }[name]


def _kept(name: str, configs: list, shape: dict, dtype: torch.dtype) -> list:
    """The configs the launcher's pruning keeps for `shape` on this device (all of them under the interpreter)."""
    if INTERPRET:
        return configs
    from tokenfleet.kernels import attention_decode as ad
    from tokenfleet.kernels import attention_prefill as ap
    from tokenfleet.kernels import gemm as gm

    t = torch.empty(0, dtype=dtype, device=DEVICE)
    if name == "gemm":
        return gm._prune_configs(configs, {"M": shape["m"], "x_ptr": t})
    if name == "attention_prefill":
        return ap._prune_configs(configs, {"S": shape["seq"], "q_ptr": t}, HEAD_D=shape["head_dim"])
    return ad._prune_configs(configs, {"k_ptr": t}, HEAD_D=shape["head_dim"])


@pytest.mark.parametrize("name", sorted(GPU_CONFIG_SHAPES))
def test_every_autotune_config(name, monkeypatch):
    kernel, configs = _gpu_space(name)
    dtype = torch.float16 if INTERPRET else torch.bfloat16  # on a GPU, the dtype the suites time
    for shape in GPU_CONFIG_SHAPES[name]:
        kept = _kept(name, configs, shape, dtype)
        assert kept
        for config in kept:
            monkeypatch.setattr(kernel, "configs", [config])  # one config: the autotuner runs it without timing
            _check_op(name, shape, dtype)


def test_gpu_autotune_spaces_are_sane():
    from tokenfleet.kernels import attention_decode as ad
    from tokenfleet.kernels import attention_prefill as ap
    from tokenfleet.kernels import gemm as gm

    # The unmasked causal stage must end on a key-block edge.
    assert all(c.kwargs["BLOCK_M"] % c.kwargs["BLOCK_N"] == 0 for c in ap._attention_configs(interpret=False))
    for dtype in (torch.float16, torch.float32):
        t = torch.empty(0, dtype=dtype)
        gemm_space = gm._gemm_configs(interpret=False)
        for m in (1, 7, 16, 33, 64, 65, 256, 16384):
            kept = gm._prune_configs(gemm_space, {"M": m, "x_ptr": t})
            assert kept and all((c.kwargs["GROUP_M"] == 1) == (m <= gm.SKINNY_M) for c in kept)
        # Every head dim keeps a config that fits H100 shared memory (sizes checked against sm90 compiles).
        for d in (16, 64, 128, 256):
            for s in (1, 64, 4096):
                kept = ap._prune_configs(ap._attention_configs(interpret=False), {"S": s, "q_ptr": t}, HEAD_D=d)
                assert kept and all((c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]) * d
                                    * t.element_size() <= 227 * 1024 for c in kept)
            assert ad._prune_configs(ad._decode_configs(interpret=False), {"k_ptr": t}, HEAD_D=d)


def test_split_choices_fill_a_gpu():
    from tokenfleet.kernels.attention_decode import _pick_chunk
    from tokenfleet.kernels.gemm import _pick_split_k

    sms = torch.device("cpu")  # 4 "SMs" off-GPU; shapes below scale the same way on a GPU
    assert _pick_split_k(1, 64, 4096, sms) > 1  # one tile: split K
    assert _pick_split_k(4096, 4096, 4096, sms) == 1  # prefill: never
    chunk = _pick_chunk(1, 1, 131072, sms)
    assert 131072 / chunk <= 64 and chunk % 16 == 0


# --------------------------------------------------------------------------------------------------
# A seeded sweep of random small shapes (fp16), beyond the hand-picked ones.

def _random_shapes(n: int = 4) -> list:
    g = torch.Generator().manual_seed(1234)

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    out = []
    for _ in range(n):
        group, hkv, d = r(1, 5), r(1, 2), [16, 32, 64][r(0, 2)]
        out += [
            ("gemm", {"m": r(1, 90), "n": r(1, 90), "k": r(1, 200)}),
            ("rmsnorm", {"rows": r(1, 20), "hidden": r(1, 300), "residual": bool(r(0, 1))}),
            ("rope", {"tokens": r(1, 9), "q_heads": group * hkv, "kv_heads": hkv, "head_dim": d}),
            ("silu_mul", {"rows": r(1, 9), "n": r(1, 300)}),
            ("attention_prefill", {"batch": r(1, 2), "q_heads": group * hkv, "kv_heads": hkv, "seq": r(1, 70),
                                   "head_dim": d, "causal": bool(r(0, 1))}),
            ("attention_decode", {"batch": r(1, 4), "q_heads": group * hkv, "kv_heads": hkv, "max_context": r(1, 70),
                                  "head_dim": d}),
        ]
    return out


@pytest.mark.parametrize("name,shape", [pytest.param(n, s, id=f"{n}-{i}") for i, (n, s) in enumerate(_random_shapes())])
def test_random_shapes(name, shape):
    _check_op(name, shape, torch.float16, seed=7)


# --------------------------------------------------------------------------------------------------
# Bad input is a clear ValueError, not a crash inside Triton.

def test_bad_inputs_raise_value_error():
    f16 = dict(device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="disagree on K"):
        gemm(torch.randn(3, 8, **f16), torch.randn(4, 9, **f16))
    with pytest.raises(ValueError, match="share one dtype"):
        gemm(torch.randn(3, 8, **f16), torch.randn(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="not supported"):
        silu_mul(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="must match"):
        silu_mul(torch.randn(3, 8, **f16), torch.randn(3, 9, **f16))
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.randn(3, 8, **f16), torch.randn(9, **f16), 1e-6)
    with pytest.raises(ValueError, match="positions"):
        rope(torch.randn(3, 2, 16, **f16), torch.randn(3, 1, 16, **f16), torch.zeros(3, device=DEVICE), 1e4)
    with pytest.raises(ValueError, match="head_dim"):
        attention_prefill(*(torch.randn(1, 2, 5, 24, **f16) for _ in range(3)))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention_prefill(torch.randn(1, 3, 5, 16, **f16), *(torch.randn(1, 2, 5, 16, **f16) for _ in range(2)))
    with pytest.raises(ValueError, match="context_lens"):
        attention_decode(torch.randn(2, 2, 16, **f16), *(torch.randn(2, 2, 8, 16, **f16) for _ in range(2)),
                         torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        silu_mul(torch.randn(3, 8, **f16), torch.randn(3, 8, **f16), out=torch.empty(3, 8, device=DEVICE))


# --------------------------------------------------------------------------------------------------
# References against independent formulas (float64, no Triton involved).

def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_gemm_ref_matches_linear():
    x = torch.randn(3, 5, 17, generator=_g(), dtype=torch.float64)
    w = torch.randn(11, 17, generator=_g(1), dtype=torch.float64)
    torch.testing.assert_close(gemm_ref(x, w), F.linear(x, w))


@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_ref_matches_loop_and_torch(residual):
    x = torch.randn(4, 13, generator=_g(), dtype=torch.float64)
    r = torch.randn(4, 13, generator=_g(1), dtype=torch.float64)
    w = torch.randn(13, generator=_g(2), dtype=torch.float64)
    h = x + r if residual else x
    expected = torch.stack([
        torch.tensor([h[i, j] / math.sqrt(sum(float(v) ** 2 for v in h[i]) / 13 + 1e-6) * w[j] for j in range(13)],
                     dtype=torch.float64)
        for i in range(4)
    ])
    got = rmsnorm_ref(x, w, 1e-6, r) if residual else rmsnorm_ref(x, w, 1e-6)
    y = got[0] if residual else got
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y, F.rms_norm(h, (13,), w, eps=1e-6))
    if residual:
        torch.testing.assert_close(got[1], h)


def test_rope_ref_matches_complex_rotation():
    t, h, d, theta = 6, 3, 16, 10000.0
    q = torch.randn(t, h, d, generator=_g(), dtype=torch.float64)
    k = torch.randn(t, 1, d, generator=_g(1), dtype=torch.float64)
    pos = torch.tensor([0, 1, 5, 77, 300, 4095])
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # fp32, as HF Llama/Qwen
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), (pos.float()[:, None] * inv_freq).double())

    def complex_rope(x):  # rotate-half pairs element j with j + D/2
        z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * rot[:, None, :]
        return torch.cat((z.real, z.imag), dim=-1)

    q_ref, k_ref = rope_ref(q, k, pos, theta)
    torch.testing.assert_close(q_ref, complex_rope(q))
    torch.testing.assert_close(k_ref, complex_rope(k))


def test_silu_mul_ref_matches_torch_silu():
    g = torch.randn(5, 23, generator=_g(), dtype=torch.float64)
    u = torch.randn(5, 23, generator=_g(1), dtype=torch.float64)
    torch.testing.assert_close(silu_mul_ref(g, u), F.silu(g) * u)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_prefill_ref_matches_sdpa(causal):
    q = torch.randn(2, 6, 11, 16, generator=_g(), dtype=torch.float64)
    k = torch.randn(2, 2, 11, 16, generator=_g(1), dtype=torch.float64)
    v = torch.randn(2, 2, 11, 16, generator=_g(2), dtype=torch.float64)
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=causal)
    torch.testing.assert_close(attention_prefill_ref(q, k, v, causal), expected)


def test_attention_decode_ref_matches_per_sequence_sdpa():
    q = torch.randn(3, 6, 16, generator=_g(), dtype=torch.float64)
    k = torch.randn(3, 2, 20, 16, generator=_g(1), dtype=torch.float64)
    v = torch.randn(3, 2, 20, 16, generator=_g(2), dtype=torch.float64)
    lens = torch.tensor([1, 13, 20], dtype=torch.int32)
    got = attention_decode_ref(q, k, v, lens)
    for b, n in enumerate(lens.tolist()):
        kb = k[b, :, :n].repeat_interleave(3, dim=0)  # [Hq, n, D]
        vb = v[b, :, :n].repeat_interleave(3, dim=0)
        expected = F.scaled_dot_product_attention(q[b][:, None, :], kb, vb)[:, 0, :]
        torch.testing.assert_close(got[b], expected)


# --------------------------------------------------------------------------------------------------
# Registry contract.

@pytest.mark.parametrize("name", list(SMALL_SHAPES))
def test_registry_contract(name):
    op = REGISTRY[name]
    assert op.name == name
    shape = SMALL_SHAPES[name][0]
    a = op.make_inputs(shape, torch.float32, "cpu", 0)
    b = op.make_inputs(shape, torch.float32, "cpu", 0)
    c = op.make_inputs(shape, torch.float32, "cpu", 1)
    floats = [i for i, t in enumerate(a) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert floats
    for i in floats:
        assert a[i].numel() == 1 or a[i].std() > 0, f"{name} input {i} is constant"
        assert torch.equal(a[i], b[i]), "same seed must give the same inputs"
        assert not torch.equal(a[i], c[i]), "a different seed must give different inputs"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert op.flops(shape) > 0 and op.bytes_moved(shape, dtype) > 0
        assert 0 < op.tolerance(dtype) < 0.05
        assert op.make_inputs(shape, dtype, "cpu", 0)[floats[0]].dtype == dtype
    assert op.bytes_moved(shape, torch.float32) == 2 * op.bytes_moved(shape, torch.float16) - _int_input_bytes(
        name, shape)
    assert isinstance(op.outputs(op.reference(*a)), tuple)


class _Created(TorchDispatchMode):
    """Records the device, size and dtype of every tensor an aten op makes while active."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.device, int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [(t.device, t.numel(), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("name,shape,dtype", [
    *[pytest.param(n, SMALL_SHAPES[n][0], torch.float32, id=n) for n in SMALL_SHAPES],
    *[pytest.param(n, SMALL_SHAPES[n][0], torch.float16, id=f"{n}-fp16") for n in SMALL_SHAPES],
    pytest.param("gemm_fp8", {"m": 5, "n": 64, "k": 256, "scale": "block"}, FP8, id="gemm_fp8"),
    pytest.param("attention_decode", SMALL_SHAPES["attention_decode"][0], FP8, id="attention_decode-fp8"),
])
def test_inputs_are_drawn_on_the_device_and_seeded(name, shape, dtype):
    # Drawn where the kernel runs: nothing larger than the context lengths is made elsewhere and copied over. On a CPU
    # too: the default device is set elsewhere (meta) while the inputs are drawn, so a draw that does not name the
    # device (a host draw, then copied) lands there: its inputs come back on the wrong device, or the draw fails.
    # In their own dtype: no float tensor of another dtype is made (a draw in fp32 then cast), except e4m3's one
    # fp32 buffer (quantized in place). Seeded: the same seed, the same bits.
    op = REGISTRY[name]
    with torch.device("meta"), _Created() as created:
        a = op.make_inputs(shape, dtype, DEVICE, 0)
    elsewhere = [n for d, n, _ in created.made if d.type != torch.device(DEVICE).type]
    assert not elsewhere or max(elsewhere) <= shape.get("batch", 1), elsewhere
    if dtype != FP8:
        other = [(n, t) for _, n, t in created.made if t.is_floating_point and t != dtype]
        assert not other, f"{name}: float tensors made in another dtype than {dtype}: {other}"
    b, c = op.make_inputs(shape, dtype, DEVICE, 0), op.make_inputs(shape, dtype, DEVICE, 1)
    tensors = [i for i, t in enumerate(a) if isinstance(t, torch.Tensor)]
    assert all(a[i].device.type == torch.device(DEVICE).type for i in tensors)
    for i in tensors:
        assert torch.equal(_bits(a[i]), _bits(b[i])), f"{name} input {i}: the same seed gave other values"
    drawn = [i for i in tensors if a[i].is_floating_point() and a[i].numel() > 1]
    assert drawn and all(not torch.equal(_bits(a[i]), _bits(c[i])) for i in drawn), "another seed, the same values"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (e4m3 has no torch.equal; NaN compares equal to itself)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _int_input_bytes(name: str, shape: dict) -> int:
    # Integer inputs do not scale with the float dtype.
    return {"rope": 4 * shape.get("tokens", 0), "attention_decode": 4 * shape.get("batch", 0)}.get(name, 0)


@pytest.mark.parametrize("name", list(SMALL_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vendor_baseline_matches_reference(name, dtype):
    # The torch backend times `baseline` (F.linear, SDPA, grouped matmuls): it must compute the same op.
    op = REGISTRY[name]
    for shape in SMALL_SHAPES[name]:
        args = op.make_inputs(shape, dtype, DEVICE, seed=3)
        ref = op.outputs(op.reference(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                        for a in args]))
        for out, r in zip(op.outputs(op.baseline(*args)), ref, strict=True):
            assert rel_error(out, r) <= op.tolerance(dtype), (name, shape)


def test_rope_takes_an_inv_freq_table():
    # Scaled RoPE (Llama 3.1) passes its own fp32 [D/2] table instead of a base theta.
    from tokenfleet.kernels.rope import _inv_freq, rope, rope_ref

    q, k, pos, theta = REGISTRY["rope"].make_inputs({"tokens": 5, "q_heads": 4, "kv_heads": 2, "head_dim": 32},
                                                    torch.float32, DEVICE, seed=4)
    table = _inv_freq(theta, 32, torch.device(DEVICE)) / torch.linspace(1, 8, 16, device=DEVICE)  # scaled
    got = rope(q, k, pos, table)
    want = rope_ref(q.double(), k.double(), pos, table)
    for g, w in zip(got, want, strict=True):
        assert rel_error(g, w) <= REGISTRY["rope"].tolerance(torch.float32)
    assert rel_error(got[0], rope_ref(q, k, pos, theta)[0]) > 1e-3  # the table changed the rotation
    with pytest.raises(ValueError, match="inv_freq table"):
        rope(q, k, pos, table[:8])


def test_counts_by_hand():
    assert REGISTRY["gemm"].flops({"m": 2, "n": 3, "k": 4}) == 48
    assert REGISTRY["gemm"].bytes_moved({"m": 2, "n": 3, "k": 4}, torch.float16) == (8 + 12 + 6) * 2
    causal = {"batch": 1, "q_heads": 2, "kv_heads": 1, "seq": 4, "head_dim": 8, "causal": True}
    assert REGISTRY["attention_prefill"].flops(causal) == 4 * 2 * 8 * 10
    assert REGISTRY["attention_prefill"].flops({**causal, "causal": False}) == 4 * 2 * 8 * 16
    dec = {"batch": 2, "q_heads": 4, "kv_heads": 2, "context": [3, 5], "max_context": 8, "head_dim": 16}
    assert REGISTRY["attention_decode"].flops(dec) == 4 * 4 * 16 * 8
    # K/V bytes follow the real lengths, not the 8-slot cache.
    assert REGISTRY["attention_decode"].bytes_moved(dec, torch.float16) == 2 * 2 * 16 * 8 * 2 + 2 * 2 * 4 * 16 * 2 + 8
    assert REGISTRY["attention_decode"].flops({**dec, "context": 4}) == REGISTRY["attention_decode"].flops(dec)


def test_rel_error():
    ref = torch.tensor([3.0, 4.0])
    assert rel_error(ref, ref) == 0.0
    assert rel_error(torch.tensor([3.0, 5.0]), ref) == pytest.approx(0.2)
    assert rel_error(torch.tensor([float("nan"), 4.0]), ref) == float("inf")
    assert kernels.KernelOp.outputs(ref) == (ref,)


@pytest.mark.parametrize("chunk", [7, 1 << 23])
def test_rel_error_is_the_fp64_norm_ratio(monkeypatch, chunk):
    # Summed where the tensors are, a chunk at a time: the same value as the whole thing in fp64 on the host, for
    # outputs in any dtype against fp32/fp64 references, strided ones too, with NaN/inf anywhere failing (inf).
    monkeypatch.setattr(registry, "REL_ERROR_CHUNK", chunk)
    g = torch.Generator().manual_seed(3)

    def direct(o, r):
        o, r = o.double(), r.double()
        return (torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r)).item()

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        ref = torch.randn(5, 13, generator=g, dtype=torch.float64)
        out = (ref + 1e-2 * torch.randn(5, 13, generator=g, dtype=torch.float64)).to(dtype)
        for r in (ref, ref.float()):
            kept = r.clone()
            assert rel_error(out, r) == pytest.approx(direct(out, r), rel=1e-12), dtype
            assert rel_error(out.t(), r.t()) == pytest.approx(direct(out, r), rel=1e-12)
            assert rel_error(out[:, ::3], r[:, ::3]) == pytest.approx(direct(out[:, ::3], r[:, ::3]), rel=1e-12)
            assert torch.equal(r, kept)  # the reference is never overwritten (its fp64 chunks are copies)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(40, generator=g)
        y = x.clone()
        y[29] = bad
        assert rel_error(y, x) == float("inf") and rel_error(x, y) == float("inf")
    zero = torch.zeros(20)
    assert rel_error(zero, zero) == 0.0 and rel_error(zero + 1, zero) == float("inf")
    assert rel_error(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(torch.zeros(3), torch.zeros(4))


def test_rel_error_reads_the_device_once(monkeypatch):
    # No copy to the host and no per-sum read: one `tolist` of the two sums is its only host sync.
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda *a: pytest.fail("item: a host sync per sum"))
    monkeypatch.setattr(torch.Tensor, "cpu", lambda *a, **k: pytest.fail("cpu: a host copy"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or real_tolist(t))
    monkeypatch.setattr(registry, "REL_ERROR_CHUNK", 16)
    x = torch.randn(100)
    assert 0 < rel_error(x + 1e-3, x) < 1
    assert reads == [2]


# --------------------------------------------------------------------------------------------------
# Model-sized shapes on a real GPU (compiled Triton, autotuned).

GPU_SHAPES = {
    "gemm": [{"m": 4096, "n": 4096, "k": 4096}, {"m": 1, "n": 4096, "k": 4096}, {"m": 200, "n": 14336, "k": 4096},
             {"m": 3, "n": 1000, "k": 4000}],
    "rmsnorm": [{"rows": 4096, "hidden": 4096, "residual": True}, {"rows": 777, "hidden": 5120, "residual": False}],
    "rope": [{"tokens": 4096, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "max_position": 131072}],
    "silu_mul": [{"rows": 2048, "n": 14336}],
    "attention_prefill": [
        {"batch": 1, "q_heads": 32, "kv_heads": 8, "seq": 2048, "head_dim": 128, "causal": True},
        {"batch": 2, "q_heads": 16, "kv_heads": 16, "seq": 1000, "head_dim": 64, "causal": True},
        {"batch": 1, "q_heads": 8, "kv_heads": 2, "seq": 777, "head_dim": 128, "causal": False},
    ],
    "attention_decode": [
        {"batch": 16, "q_heads": 32, "kv_heads": 8, "max_context": 8192, "head_dim": 128},
        {"batch": 1, "q_heads": 28, "kv_heads": 4, "context": 131072, "head_dim": 128},
        {"batch": 64, "q_heads": 16, "kv_heads": 16, "max_context": 1000, "head_dim": 64},
    ],
}


@pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs a CUDA GPU (compiled Triton)")
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    @pytest.mark.parametrize(
        "name,shape", [pytest.param(n, s, id=f"{n}-{i}") for n, ss in GPU_SHAPES.items() for i, s in enumerate(ss)])
    def test_op_at_model_shapes(self, name, shape, dtype):
        _check_op(name, shape, dtype, device="cuda")
