"""How long `pacrecon demo` takes from start to exit, on this machine, N runs.

    .venv/bin/python bench/demo.py [--runs 3]

Target (issue 7): under 60 s on a 2-core machine. Prints each run's wall time and
the median, and the machine's load average before and after (it is shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACRECON_")}
    print(f"load average before: {os.getloadavg()}")
    times = []
    for _ in range(args.runs):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "pacrecon", "demo", "--seed", str(args.seed)], env=env,
                              capture_output=True, text=True)
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"the demo failed ({done.returncode}):\n{done.stderr[-2000:]}")
        times.append(elapsed)
        print(f"run: {elapsed:.1f} s")
    print(f"median {statistics.median(times):.1f} s of {args.runs}; max {max(times):.1f} s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
