"""`tokenfleet report`: a synthetic run with points of every kind (and failed ones) as HTML + markdown, the HTML
checked in real headless Chromium (it loads, every table heading is there, the plots render)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli, run_cli
from tokenfleet import results
from tokenfleet.hardware import load_hardware
from tokenfleet.report import document as report

# In the report's order: the planner's answer first, then the model, then the kernels.
HEADINGS = ["Headline: how much of 14T and 140T tokens/day, and what it would take", "Capacity against demand",
            "Prefill", "Decode", "Kernels", "Ceilings (measured)", "Device and environment", "Points not ok"]


def synthetic_points(scale: float = 1.0) -> list[dict]:
    """Points of every kind and status, H100-like numbers; `scale` multiplies every time (a slower run)."""

    def timed(ms: float, **extra) -> dict:
        ms *= scale
        return {"median_ms": ms, "p20_ms": ms * 0.98, "p80_ms": ms * 1.02, "spread": 0.04, "n_samples": 20, **extra}

    pts = [
        {"kind": "ceiling", "op": "copy", "dtype": "fp32", "mb": 1024, "status": "ok", "value": 2900 / scale,
         "unit": "GB/s", "datasheet_value": 3350, **timed(0.74, bytes=2 * 2**30)},
        {"kind": "ceiling", "op": "matmul", "dtype": "bf16", "m": 8192, "n": 8192, "k": 8192, "status": "ok",
         "value": 700 / scale, "unit": "TFLOP/s", "datasheet_value": 989, **timed(1.57, flops=2 * 8192**3)},
        {"kind": "ceiling", "op": "matvec", "dtype": "bf16", "m": 1, "n": 8192, "k": 8192, "status": "ok",
         "value": 2600 / scale, "unit": "GB/s", "datasheet_value": 3350, **timed(0.052, bytes=2 * 8192**2)},
    ]
    for m in (1, 16, 256, 4096):  # gemm 4096x4096 at growing M: from bandwidth- to compute-bound
        flops, byts = 2 * m * 4096 * 4096, 2 * (m * 4096 + 4096 * 4096 + m * 4096)
        ms = max(flops / 650e12, byts / 2.8e12) * 1e3
        for backend, f in (("torch", 1.0), ("triton", 1.1)):
            pts.append({"kind": "kernel", "op": "gemm", "backend": backend, "dtype": "bf16", "m": m, "n": 4096,
                        "k": 4096, "status": "ok", "flops": flops, "bytes": byts,
                        "tflops": flops / (ms * f * scale / 1e3) / 1e12, "gbps": byts / (ms * f * scale / 1e3) / 1e9,
                        **timed(ms * f)})
    pts += [
        {"kind": "kernel", "op": "rmsnorm", "backend": "torch", "dtype": "bf16", "rows": 8192, "hidden": 4096,
         "status": "ok", "flops": 4 * 8192 * 4096, "bytes": 4 * 8192 * 4096, "gbps": 2400, **timed(0.056)},
        {"kind": "kernel", "op": "rmsnorm", "backend": "triton", "dtype": "bf16", "rows": 8192, "hidden": 4096,
         "status": "incorrect", "error": "relative error 0.3 > tolerance 0.01"},
        {"kind": "kernel", "op": "rope", "backend": "triton", "dtype": "bf16", "tokens": 65536, "q_heads": 32,
         "kv_heads": 8, "head_dim": 128, "status": "skipped", "note": "Triton's interpreter is a correctness tool"},
    ]
    for plen in (512, 2048):
        pts.append({"kind": "prefill", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16", "batch": 1,
                    "prompt_len": plen, "status": "ok", "ttft_ms": plen / 20 * scale,
                    "tokens_per_s": 20000 / scale, "mfu": 0.6, **timed(plen / 20)})
    pts.append({"kind": "prefill", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16", "batch": 1,
                "prompt_len": 8192, "status": "error", "error": "RuntimeError: boom"})
    for ctx in (1024, 4096):
        for b in (1, 8, 32, 128):
            if b == 128 and ctx == 4096:
                pts.append({"kind": "decode", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16",
                            "batch": b, "context": ctx, "status": "oom", "error": "CUDA out of memory"})
                continue
            tpot = (6.0 + 0.02 * b * ctx / 1024) * scale
            pts.append({"kind": "decode", "model": "llama-3.1-8b", "backend": "torch", "dtype": "bf16", "batch": b,
                        "context": ctx, "status": "ok", "tpot_ms": tpot, "tokens_per_s": b * 1e3 / tpot,
                        "tokens_per_s_per_seq": 1e3 / tpot, "mbu": 0.8, **timed(tpot / scale)})
    return pts


def make_run(folder: Path, points: list[dict], device: str = "NVIDIA H100 80GB HBM3", run_id: str = "run-a") -> Path:
    sheet = load_hardware("h100-sxm").model_dump()
    w = results.RunWriter(folder, {
        "run_id": run_id, "suite": "synthetic", "command": "test", "created": "2026-03-20T00:00:00+00:00",
        "environment": {"device": {"kind": "cuda", "name": device, "memory_bytes": 80 * 2**30,
                                   "torch_version": "2.x", "datasheet": "h100-sxm"}, "datasheet": sheet},
        "ceilings": {"copy_gbps": 2900, "matvec_gbps": {"bf16": 2600}, "matmul_tflops": {"bf16": 700}}})
    for p in points:
        w.append(p)
    w.close()
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run", synthetic_points())


def test_report_of_run_with_failed_points(run_dir: Path, tmp_path: Path):
    html_path, md_path = report.write(run_dir)
    assert (html_path, md_path) == (run_dir / "report.html", run_dir / "report.md")
    text = html_path.read_text()
    at = [text.index(f"<h2>{h}</h2>") for h in HEADINGS]
    assert at == sorted(at)
    assert "<script" not in text.lower() and "http://" not in text and "https://" not in text  # offline, no JS
    assert text.count("data:image/png;base64,") == 2  # roofline + decode; capacity left out without --fleet
    assert "no fleet given" in text
    for status in ("oom", "error", "incorrect"):
        assert f'<td class="txt">{status}</td>' in text
    # skipped rows are folded into one line per op and backend, with the reason
    assert '<td class="txt">skipped</td>' not in text
    assert "skipped (Triton&#x27;s interpreter is a correctness tool): rope triton ×1" in text
    visible = re.sub(r"data:[^\"')]+", "", text)  # base64 images and the font could hold any letters
    assert "&lt;NA&gt;" not in visible and ">nan<" not in visible.lower()
    md = md_path.read_text()
    for h in HEADINGS:
        assert f"## {h}" in md
    for png in re.findall(r"\]\((report-\w+\.png)\)", md):
        assert (run_dir / png).read_bytes().startswith(b"\x89PNG")


def test_report_without_kernel_or_decode_points(tmp_path: Path):
    run = make_run(tmp_path / "run", [p for p in synthetic_points() if p["kind"] in ("ceiling", "prefill")])
    rep = report.build(run)
    notes = " ".join(n for s in rep.sections for n in s.notes)
    assert "no kernel points" in notes and "no decode points" in notes


def test_report_cli_paths_and_bad_run(run_dir: Path, tmp_path: Path):
    r = run_cli("report", str(run_dir), "--html", str(tmp_path / "out" / "r.html"), "--md", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "out" / "r.html"), str(tmp_path / "r.md")]
    assert (tmp_path / "r-roofline.png").is_file()
    r = invoke_cli("report", str(tmp_path / "nope"))
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_report_with_fleet(run_dir: Path):
    rep = report.build(run_dir, ["h100-node"])
    head, cap = rep.sections[:2]
    assert head.title.startswith("Headline") and cap.title == "Capacity against demand"
    assert head.text[0].startswith("h100-node: 8 GPUs serve") and any("140T/day" in line for line in head.text)
    assert cap.plot and cap.tables and len(cap.tables[0][1])
    main, detail = cap.tables[0][1], cap.tables[1][1]
    assert "tp" not in main and "coverage_vs_china_nda" in main and "gpus_needed_alone" in main
    assert "tp" in detail and list(detail["gpu"]) == ["h100-sxm"]
    md = report.to_markdown(rep, "r")[0]
    assert md.index("## Headline") < md.index("## Capacity against demand") < md.index("## Prefill")
    assert "<NA>" not in md


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")  # scripts/ensure_chromium.sh's too
REQUIRE_CHROMIUM = ("CI", "TOKENFLEET_REQUIRE_CHROMIUM")  # set (non-empty, not 0): a missing Chromium fails


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def _need_chromium() -> None:
    """Skip without Chromium, locally; fail under CI (`.ci/run` exports TOKENFLEET_REQUIRE_CHROMIUM), where a skip
    would pass the HTML checks silently."""
    if _chromium() is not None:
        return
    required = [v for v in REQUIRE_CHROMIUM if os.environ.get(v, "") not in ("", "0")]
    if required:
        pytest.fail(f"Chromium not found and {required[0]} is set: the HTML report checks must run "
                    "(scripts/ensure_chromium.sh installs it)", pytrace=False)
    pytest.skip("Chromium not found (scripts/ensure_chromium.sh installs it)")


@pytest.fixture
def chromium() -> None:
    _need_chromium()


def _chrome(*args: str, profile: Path) -> subprocess.CompletedProcess:
    # The background-networking flags matter in closed networks: without them Chromium's own connections hang.
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=60)


def test_html_in_headless_chromium(chromium, run_dir: Path, tmp_path: Path):
    html_path, _ = report.write(run_dir, ["h100-node"])
    url = html_path.resolve().as_uri()
    dom = _chrome("--dump-dom", url, profile=tmp_path / "p1").stdout
    at = [dom.index(f"<h2>{h}</h2>") for h in HEADINGS]
    assert at == sorted(at), "the headline and the capacity table come first, then prefill/decode, then kernels"
    assert dom.index('<pre class="headline">') < dom.index("<table") < dom.index("<h2>Prefill</h2>")
    # every table survived parsing: as many <table> elements as the report has non-empty tables
    rep = report.build(run_dir, ["h100-node"])
    assert dom.count("<table") == sum(1 for s in rep.sections for _, t in s.tables if len(t))
    assert dom.count('src="data:image/png;base64,') == 3

    shot = tmp_path / "shot.png"
    _chrome(f"--screenshot={shot}", "--window-size=1400,4000", url, profile=tmp_path / "p2")
    from matplotlib.image import imread

    img = imread(shot)
    assert img.shape[0] >= 3000 and img.shape[1] >= 1000
    rgb = (img[..., :3] * 255).round().astype(np.uint32)
    packed = np.unique((rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).ravel())
    # Measured here: this page renders ~1400 distinct colours with its plots and ~220 with the images removed
    # (text anti-aliasing only), so 600 means the PNGs were decoded and drawn.
    assert len(packed) > 600, f"screenshot looks blank or plot-less: {len(packed)} distinct colours"
    assert (31 << 16 | 119 << 8 | 180) in packed  # matplotlib's first line colour (C0): a plot, not just text

    # The headline block comes first on screen: its background (#f6f8fa) fills rows near the top of the page.
    top = rgb[:700]
    assert ((top[..., 0] == 246) & (top[..., 1] == 248) & (top[..., 2] == 250)).sum() > 20_000


def _glyph_crops(shot: Path, n: int) -> list[np.ndarray]:
    from matplotlib.image import imread

    img = imread(shot)[..., :3]
    return [img[10:190, 10 + 200 * i:190 + 200 * i].mean(axis=2) for i in range(n)]


def test_cjk_renders_not_tofu(chromium, tmp_path: Path):
    """万 and 亿 through the report's own style (its embedded font) render as two different glyphs with ink; a
    missing glyph (tofu) draws the same box for every character, which a private-use character shows."""
    cells = "".join(f'<div style="position:absolute;left:{200 * i}px;top:0;width:200px;height:200px;font-size:150px;'
                    f'line-height:200px;text-align:center">{c}</div>' for i, c in enumerate("万亿\ue000\ue001"))
    page = tmp_path / "cjk.html"
    page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{report.font_face()}{report.CSS}'
                    f"body {{ margin: 0; }}</style></head><body>{cells}</body></html>")
    shot = tmp_path / "cjk.png"
    _chrome(f"--screenshot={shot}", "--window-size=800,200", page.resolve().as_uri(), profile=tmp_path / "p3")
    wan, yi, tofu1, tofu2 = _glyph_crops(shot, 4)
    ink = [float((c < 0.5).mean()) for c in (wan, yi)]
    assert all(0.02 < i < 0.5 for i in ink), f"no glyph drawn: ink {ink}"
    assert np.abs(wan - yi).mean() > 0.02, "万 and 亿 look the same: tofu boxes, not glyphs"
    for t in (tofu1, tofu2):  # the negative control: whatever a missing glyph draws, 万 and 亿 are not it
        assert np.abs(wan - t).mean() > 0.02 and np.abs(yi - t).mean() > 0.02


# ---- CI fails, not skips, without Chromium ---------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("env", [{}, {"CI": "true"}, {"TOKENFLEET_REQUIRE_CHROMIUM": "1"}, {"CI": "0"}])
def test_missing_chromium_fails_under_ci_and_skips_elsewhere(env, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for v in REQUIRE_CHROMIUM:
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    required = any(v not in ("", "0") for v in env.values())
    with pytest.raises(pytest.fail.Exception if required else pytest.skip.Exception, match="Chromium not found"):
        _need_chromium()


def _tools(folder: Path, names: tuple[str, ...], fake: dict[str, str] | None = None) -> Path:
    """A PATH folder holding only `names` (links to the real tools) and `fake` scripts (name -> body)."""
    folder.mkdir()
    for name in names:
        (folder / name).symlink_to(shutil.which(name))
    for name, body in (fake or {}).items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def test_ensure_chromium_exits_nonzero_when_it_cannot_provide_it(tmp_path: Path):
    script = ROOT / "scripts" / "ensure_chromium.sh"
    bash = shutil.which("bash")
    bare = _tools(tmp_path / "bare", ("id",))  # no Chromium, no apt-get
    r = subprocess.run([bash, str(script)], env={"PATH": str(bare)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot provide Chromium" in r.stderr and "no apt-get" in r.stderr, r
    # apt-get there but failing (offline): still a failure, with its reason
    offline = _tools(tmp_path / "offline", ("id",), {"apt-get": "exit 100"})
    r = subprocess.run([bash, str(script)], env={"PATH": str(offline)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "apt-get update failed" in r.stderr, r
    found = _tools(tmp_path / "found", (), {"chromium": "exit 0"})  # already there: nothing to do
    r = subprocess.run([bash, str(script)], env={"PATH": str(found)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r


def test_ci_stops_when_chromium_cannot_be_installed(tmp_path: Path):
    """.ci/run exports TOKENFLEET_REQUIRE_CHROMIUM and stops with one clear line when ensure_chromium.sh fails,
    before `make test` (a fake here that records it ran)."""
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    (tree / "scripts").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tree / ".ci" / "run")
    shutil.copy(ROOT / "scripts" / "ensure_chromium.sh", tree / "scripts" / "ensure_chromium.sh")
    ran = tmp_path / "make-ran"
    tools = _tools(tmp_path / "bin", ("bash", "dirname", "id", "tee", "grep"), {"make": f"touch {ran}"})
    r = subprocess.run([shutil.which("bash"), str(tree / ".ci" / "run")], env={"PATH": str(tools)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and not ran.exists(), r
    assert r.stderr.strip().splitlines()[-1].startswith("CI: Chromium could not be installed"), r.stderr
    # with Chromium there, CI goes on to `make test`, with the requirement exported to it
    (tools / "chromium").write_text("#!/bin/sh\nexit 0\n")
    (tools / "chromium").chmod(0o755)
    (tools / "make").write_text(f'#!/bin/sh\necho "$TOKENFLEET_REQUIRE_CHROMIUM" > {ran}\necho "1 passed"\n')
    r = subprocess.run([shutil.which("bash"), str(tree / ".ci" / "run")], env={"PATH": str(tools)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and ran.read_text().strip() == "1", r
