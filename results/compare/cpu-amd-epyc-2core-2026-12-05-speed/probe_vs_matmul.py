"""The speed probe beside a cold-cache 64x1024x4096 fp32 matmul for 70 s, 0.2 s windows (issue 24).
Run: .venv/bin/python results/compare/cpu-amd-epyc-2core-2026-12-05-speed/probe_vs_matmul.py; output in
probe_vs_matmul.txt beside it (seconds, probe before, matmul median ms, probe after, probe after 50 ms idle).
2026-12-05 04:00 UTC, the 2-vCPU AMD EPYC development VM, commit 27cb844."""
import time, torch, statistics as st
from tokenfleet.measure.load import SpeedProbe
torch.set_num_threads(2)
sp = SpeedProbe()
a = torch.randn(64, 1024); b = torch.randn(1024, 4096)
fl = torch.empty(2*32*2**20//4)
def window(T=0.2):
    xs=[]; t0=time.perf_counter()
    while time.perf_counter()-t0 < T:
        fl.zero_(); t=time.perf_counter(); torch.mm(a,b); xs.append(time.perf_counter()-t)
    return st.median(xs)*1e3, len(xs)
rows=[]
t0=time.time()
while time.time()-t0 < 70:
    p1 = sp(); w, n = window(); p2 = sp(); time.sleep(0.05); p3 = sp()
    rows.append((round(time.time()-t0,1), p1, w, p2, p3))
for r in rows: print(f"{r[0]:5.1f} begin {r[1]:5.2f} gemm {r[2]:6.3f} end {r[3]:5.2f} idle {r[4]:5.2f}")
