#!/usr/bin/env python3
"""Learning curve of custom theme sets, measured on the four built-in themes treated as custom.

For each number of examples per theme (0 = descriptions only) and each sample seed, it writes a
theme-set file: the descriptions of `examples/theme-sets/built-in-described.toml`, and an
`examples_file` with, per theme, K texts that carry it and K texts with no theme, drawn from the
training split of `training-data/themes/` (never the dev split, never the blind set), each with
all its labels, as a user would label a file for a set. It trains the set with
`train_themes --theme-set` (timed) and scores it with `evaluate themes --heads` on the chosen
input, then prints one Markdown row per K: macro-F1 (mean and range over the samples) and the
training time.

    python3 scripts/theme_set_learning_curve.py --input training-data/themes-blind \
        --examples 0 8 32 --samples 3

Build first: `cargo build --release --examples`.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEMES = ["recruitment", "takedown", "foreign_interference", "financing"]


def fnv1a(s: str) -> int:
    h = 0xCBF29CE484222325
    for b in s.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def train_split():
    rows = []
    for f in sorted((ROOT / "training-data/themes").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                story = r.get("story") or r["id"]
                if fnv1a(story) % 5 != 0:  # the dev split is one story in five
                    rows.append(r)
    return rows


def toml_string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def write_set(path: Path, k: int, seed: int, rows, described_file: Path) -> None:
    described = tomllib.loads(described_file.read_text())
    rng = random.Random(seed)
    negatives = [r for r in rows if not r["labels"]]
    chosen = []
    for theme in described["theme"]:
        if k:
            chosen += rng.sample([r for r in rows if theme["name"] in r["labels"]], k)
            chosen += rng.sample(negatives, k)
    examples = path.with_suffix(".jsonl")
    examples.write_text(
        "".join(json.dumps({"text": r["text"], "labels": r["labels"]}, ensure_ascii=False) + "\n"
                for r in chosen),
        encoding="utf-8")
    out = [f'name = "built-in-k{k}-s{seed}"']
    for theme in described["theme"]:
        out.append("\n[[theme]]")
        out.append(f"name = {toml_string(theme['name'])}")
        out.append("descriptions = [" + ", ".join(map(toml_string, theme["descriptions"])) + "]")
        if k:
            out.append(f"examples_file = {toml_string(examples.name)}")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", default="training-data/themes-blind")
    ap.add_argument("--split", default="all", help="split passed to evaluate (all, dev)")
    ap.add_argument("--examples", type=int, nargs="+", default=[0, 8, 32])
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--work", default="target/theme-set-curve")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--train-args", default="", help="extra train_themes arguments")
    ap.add_argument("--set", default="examples/theme-sets/built-in-described.toml",
                    help="the descriptions of the four themes, as a theme-set file")
    ap.add_argument("--seed-offset", type=int, default=0, help="first sample seed")
    ap.add_argument("--fast", action="store_true",
                    help="score with train_themes --score-on (cached features) instead of "
                         "evaluate; the time column then includes the scoring")
    args = ap.parse_args()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = train_split()
    bin_dir = ROOT / "target/release/examples"
    print("| examples per theme | macro-F1 (mean) | range | samples | train time (s, mean) |")
    print("| --- | --- | --- | --- | --- |")
    for k in args.examples:
        scores, times = [], []
        for seed in range(args.seed_offset, args.seed_offset + (args.samples if k else 1)):
            set_file = work / f"k{k}-s{seed}.toml"
            out = work / f"k{k}-s{seed}"
            write_set(set_file, k, seed, rows, ROOT / args.set)
            started = time.monotonic()
            fast = ["--score-on", args.input, "--score-split", args.split] if args.fast else []
            trained = subprocess.run(
                [str(bin_dir / "train_themes"), "--theme-set", str(set_file), "--out", str(out),
                 "--threads", args.threads, *fast, *args.train_args.split()],
                cwd=ROOT, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.PIPE,
                text=True)
            times.append(time.monotonic() - started)
            if args.fast:
                result = trained
            else:
                result = subprocess.run(
                    [str(bin_dir / "evaluate"), "themes", "--heads", str(out), "--input",
                     args.input, "--split", args.split, "--threads", args.threads],
                    cwd=ROOT, check=True, capture_output=True, text=True)
            (work / f"k{k}-s{seed}.eval.txt").write_text(result.stdout)
            scores.append(float(re.search(r"^macro_f1 ([0-9.]+)$", result.stdout, re.M).group(1)))
            print(f"  k={k} sample {seed}: macro_f1 {scores[-1]:.4f}, trained in {times[-1]:.1f}s",
                  file=sys.stderr)
        print(f"| {k} | {sum(scores) / len(scores):.3f} | {min(scores):.3f}-{max(scores):.3f} "
              f"| {len(scores)} | {sum(times) / len(times):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
