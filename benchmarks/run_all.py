"""Run every CPU-sized benchmark, one process each (``make bench``); results are recorded in BENCHMARKS.md.

    python -m benchmarks.run_all [--only=heads,attention]

The GPU-sized one (``bench_backbone_scale``) needs an accelerator and is run by hand.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CPU_BENCHMARKS = ("bench_attention", "bench_backbone", "bench_heads", "bench_train_step", "bench_data", "bench_serve")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated subset, e.g. heads,attention")
    args = p.parse_args()
    chosen = [f"bench_{n.strip().removeprefix('bench_')}" for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(CPU_BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; known: {list(CPU_BENCHMARKS)}")
    failed = []
    for name in chosen or CPU_BENCHMARKS:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.time()
        if subprocess.call([sys.executable, "-m", f"benchmarks.{name}"]):
            failed.append(name)
        print(f"({name}: {time.time() - t0:.0f} s)", flush=True)
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    main()
