"""Search the fused MoE kernel's block sizes on this GPU; write configs/tuned/<device>.json, which kernels.moe reads.

    python benchmarks/tune_moe.py --model qwen3-30b-a3b --dtype bf16 --tokens 1 8 64 256 1024 4096
    python benchmarks/tune_moe.py --model deepseek-v3 --dtype fp8 --experts 32 --tokens 1 64 256   # an EP8 slice

Per token count the shape's inputs are drawn as the kernels part draws them (uniform routing, seed 0); every candidate
config is checked against `moe_ref` before it is timed (triton.testing.do_bench, median), and the fastest correct one
is kept. The file keeps entries of other shapes; the same shape, dtype and slot count is replaced. The file records the
command, date and versions, as a result file does. vLLM tunes its fused_moe the same way (per device, per E, N and M).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenfleet.kernels import moe, rel_error
from tokenfleet.kernels._triton import smem_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": moe.FP8}


def search_space(fp8: bool, device) -> list[dict]:
    """Tiles for skinny (decode) to tall (prefill) slot counts; e4m3 keeps BLOCK_N 128 (one scale group per tile).
    Candidates whose pipelined A and two B tiles exceed the device's shared memory are left out."""
    out = []
    for bm, bn, bk, gm, (w, s) in itertools.product((16, 32, 64, 128), (128,) if fp8 else (32, 64, 128),
                                                    (64, 128), (1, 16), ((4, 3), (4, 4), (8, 3))):
        es = 1 if fp8 else 2
        if s * (bm * bk + 2 * bk * bn) * es > smem_bytes(torch.device(device)) - 16 * 1024:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm, "num_warps": w, "num_stages": s})
    return out


def tune(shape: dict, dtype: torch.dtype, device, space: list[dict],
         timer: Callable[[Callable[[], object]], float]) -> tuple[dict, float]:
    """(the fastest config of `space` whose output is within the op's tolerance of the reference, its ms)."""
    args = moe.make_inputs(shape, dtype, device, 0)
    up = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    ref = moe.moe_ref(*up)
    best = None
    for cfg in space:
        try:
            err = rel_error(moe.moe(*args, config=cfg), ref)
        except Exception as e:  # noqa: BLE001 - a config that does not compile (resources) is not a candidate
            print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        if not err <= moe.tolerance(dtype):
            print(f"  skip {cfg}: relative error {err:.3g}", file=sys.stderr)
            continue
        ms = timer(lambda c=cfg: moe.moe(*args, config=c))
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        raise RuntimeError(f"tune_moe: no config of {len(space)} ran correctly at {shape}")
    return best


def merge(path: Path, entries: list[dict], meta: dict) -> None:
    """Write `entries` into the tuned file at `path`, replacing those of the same shape, dtype and slots."""
    data = json.loads(path.read_text()) if path.is_file() else {"moe": []}
    key = ("experts", "hidden", "inter", "dtype", "slots")
    new = {tuple(e[k] for k in key) for e in entries}
    data["moe"] = [e for e in data.get("moe", []) if tuple(e[k] for k in key) not in new] + entries
    data.update(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    from tokenfleet.model.spec import load_model_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="an MoE model config (configs/models)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--tokens", type=int, nargs="+", required=True)
    p.add_argument("--experts", type=int, help="experts held (an EP slice); default: all of the model's")
    ns = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_moe: needs a CUDA GPU (interpreted Triton timings mean nothing)")
    import triton.testing

    cfg = load_model_config(ns.model)
    if cfg.moe is None:
        raise SystemExit(f"tune_moe: {ns.model} has no MoE layers")
    device = torch.device("cuda")
    dtype = DTYPES[ns.dtype]
    experts = ns.experts or cfg.moe.num_experts
    space = search_space(ns.dtype == "fp8", device)
    entries = []
    for t in ns.tokens:
        shape = {"tokens": t, "hidden": cfg.hidden_size, "inter": cfg.moe.moe_intermediate_size, "experts": experts,
                 "topk": cfg.moe.experts_per_token}
        best, ms = tune(shape, dtype, device, space, lambda fn: triton.testing.do_bench(fn, return_mode="median"))
        print(f"tokens {t}: {best} {ms:.4f} ms")
        entries.append({"experts": experts, "hidden": shape["hidden"], "inter": shape["inter"], "dtype": ns.dtype,
                        "slots": t * shape["topk"], "config": best, "ms": ms, "model": ns.model})
    path = moe.TUNED_DIR / f"{moe.device_slug(device)}.json"
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    merge(path, entries, {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                          "triton": triton.__version__, "date": date,
                          "command": " ".join(["python", "benchmarks/tune_moe.py", *(argv or sys.argv[1:])])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
