"""Write the outputs of the commands README quotes (capacity with the H200 runs, project examples, the primary
demand's growth fit) as committed files under results/readme/, each with its command, date and commit, so
`docs/claims.yaml` can tie README's numbers to them. Run from the repository root:

    python scripts/readme_results.py          # about 30 s on a 2-core CPU; no device work (projections only)
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

from tokenfleet.provenance import git_sha

ROOT = Path(__file__).resolve().parent.parent
H200 = "--run results/reference/h200-2026-11-28/followup/run --run results/reference/h200-2026-11-28/quick/run"
CPU = "--run results/reference/cpu-amd-epyc-2core-2026-12-04"
COMMANDS = {
    "capacity-china-h200": f"tokenfleet capacity --fleet china-2026-mix {H200} --format json",
    "capacity-china-nda-cpu": f"tokenfleet capacity --fleet china-2026-mix --demand china-nda {CPU} --format json",
    "project-llama-3.1-8b-h200-chat": f"tokenfleet project -m llama-3.1-8b -g h200 --dtype bf16 --tp 1 -w chat {H200} "
                                      "-f json",
    "project-deepseek-v3-day6": "tokenfleet project -m deepseek-v3 -g h800 --dtype fp8 --deployment deepseek-v3-day6 "
                                "--input-len 4383 --output-len 1211 --prefix-cache-hit 0.5625 --tpot-ms 47.6 "
                                "--ttft-ms 1e9 -f json",
}


def main() -> int:
    out = ROOT / "results" / "readme"
    out.mkdir(parents=True, exist_ok=True)
    sha = git_sha(ROOT)[:7]  # "unknown" outside this repository
    for name, cmd in COMMANDS.items():
        argv = [sys.executable, "-m", "tokenfleet", *cmd.split()[1:]]
        res = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            print(f"error: {cmd}: exit {res.returncode}: {res.stderr.strip()[-300:]}", file=sys.stderr)
            return 1
        data = {"command": cmd, "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
                "commit": sha, "written_by": "python scripts/readme_results.py",
                "device": "none: projections (efficiencies from the runs named in the command, else defaults)",
                "output": json.loads(res.stdout)}
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        print(f"wrote results/readme/{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
