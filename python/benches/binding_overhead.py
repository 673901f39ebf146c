"""Binding overhead: `themescan.Analyzer.analyze_many` from Python against the crate's own
`Analyzer::analyze_many` on the same texts, same analyzer, paired rounds in one process.

    python python/benches/binding_overhead.py [--texts 500] [--rounds 5] [--threads 2]

Each round times both calls back to back (alternating which goes first) and prints the ratio;
the summary is the median ratio with its min and max.
"""

import argparse
import glob
import json
import statistics
import time
from pathlib import Path

import themescan

REPO = Path(__file__).resolve().parents[2]


def texts(n):
    out = []
    for path in sorted(glob.glob(str(REPO / "training-data" / "themes" / "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            out.extend(json.loads(line)["text"] for line in f)
    step = max(1, len(out) // n)
    return out[::step][:n]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--texts", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sample = texts(args.texts)
    analyzer = themescan.Analyzer(threads=args.threads)
    analyzer.analyze_many(sample[:20])  # warm-up
    ratios = []
    for r in range(args.rounds):
        def python_side():
            started = time.perf_counter()
            analyzer.analyze_many(sample)
            return time.perf_counter() - started

        def crate_side():
            return analyzer._native.time_crate_analyze_many(sample)

        if r % 2:
            py, rust = python_side(), crate_side()
        else:
            rust, py = crate_side(), python_side()
        ratios.append(py / rust)
        print(f"round {r + 1}: python {py:.2f} s, crate {rust:.2f} s, ratio {py / rust:.4f}", flush=True)
    print(
        f"{len(sample)} texts, {args.rounds} rounds: python/crate median {statistics.median(ratios):.4f} "
        f"(min {min(ratios):.4f}, max {max(ratios):.4f})"
    )


if __name__ == "__main__":
    main()
