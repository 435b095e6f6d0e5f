"""Wall time of the example's training run with AttentionMonitor and without it (run by hand, not a test).

    python benchmarks/bench_example.py              # the full example twice each way, ~10 min on 2 CPU cores
    python benchmarks/bench_example.py --fast       # its smoke run

Runs ``examples/train_vit.py --threads 2`` and ``... --no-monitor`` alternately in fresh processes, each writing to a
temporary log directory, and prints the wall time of each process, their ratio, and whether both ended with the
same weights digest (the monitor must not change training).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_vit.py"


def run(monitor: bool, fast: bool, threads: int) -> tuple[float, str]:
    """Seconds of one whole example process and its final weights digest."""
    with tempfile.TemporaryDirectory() as logdir:
        command = [sys.executable, str(EXAMPLE), "--threads", str(threads), "--logdir", logdir]
        command += ["--fast"] if fast else []
        command += [] if monitor else ["--no-monitor"]
        start = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
    digest = re.search(r"Final weights digest: (\w+)", out.stdout)
    return seconds, digest.group(1) if digest else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the example's smoke run")
    parser.add_argument("--repeats", type=int, default=2, help="runs each way (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="the example's --threads (default: %(default)s)")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{date.today()}; examples/train_vit.py --threads {args.threads}{' --fast' if args.fast else ''}\n"
    )
    with_monitor, without, digests = [], [], set()
    for _ in range(args.repeats):
        for monitor, times in ((True, with_monitor), (False, without)):
            seconds, digest = run(monitor, args.fast, args.threads)
            times.append(seconds)
            digests.add(digest)
    a, b = statistics.median(with_monitor), statistics.median(without)
    print("| example run | with AttentionMonitor (s) | --no-monitor (s) | ratio | same final weights |")
    print("|---|---|---|---|---|")
    runs = ", ".join(f"{x:.0f}" for x in with_monitor), ", ".join(f"{x:.0f}" for x in without)
    print(
        f"| median of {args.repeats} ({runs[0]} / {runs[1]}) | {a:.1f} | {b:.1f} | {a / b:.2f} | "
        f"{'yes' if len(digests) == 1 else 'NO: ' + ', '.join(sorted(digests))} |"
    )


if __name__ == "__main__":
    main()
