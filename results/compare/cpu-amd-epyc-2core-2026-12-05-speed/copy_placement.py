"""Three separately allocated 128 MB fp32 buffer pairs, each copied 5 times in turn (median rate, GB/s counting read
and write), with the speed probe before each round, for 60 s (issue 24: why the copy and read ceilings move).
Run: .venv/bin/python results/compare/cpu-amd-epyc-2core-2026-12-05-speed/copy_placement.py; output in
copy_placement.txt beside it (seconds, probe us, the three sets' rates). 2026-12-05 04:41 UTC, the 2-vCPU AMD EPYC
development VM, commit 19dc610."""
import time, torch, statistics as st
from tokenfleet.measure.load import SpeedProbe
torch.set_num_threads(2)
sp = SpeedProbe()
n = 32 * 2**20  # 128 MB fp32
sets = []
for i in range(3):
    a = torch.ones(n); b = torch.zeros(n); sets.append((a, b))
def copy_gbps(a, b, k=5):
    xs = []
    for _ in range(k):
        t = time.perf_counter(); b.copy_(a); xs.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / st.median(xs) / 1e9
t0 = time.time()
while time.time() - t0 < 60:
    s = sp()
    rates = [copy_gbps(a, b) for a, b in sets]
    print(f"{time.time()-t0:5.1f} probe {s:5.2f} " + " ".join(f"{r:5.1f}" for r in rates), flush=True)
