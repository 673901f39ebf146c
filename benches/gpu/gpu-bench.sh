#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds themescan with `--features cuda`, runs the GPU tests
# (required to run, not skip), then measures encoder throughput of themescan (f32 and bf16 dense
# weights) and PyTorch (fp32 and bf16, SDPA attention) on the same texts and card, and prints
# one table. Meant to finish in under 10 minutes, build included, on a fresh GPU machine.
#
# Usage: bash benches/gpu/gpu-bench.sh [COPIES=40]
#   COPIES: how many times the 60 news texts of benches/data/news.jsonl are repeated, so that
#   each timed run is long enough to measure.
# Each engine's figure counts the tokens it encoded: themescan encodes a text over 512 tokens in
# full (overlapping windows), PyTorch cuts it at 512; themescan's figure is the `embed` example's
# own summary (reading, tokenising, encoding, pooling, writing), PyTorch's the encoder and pooling
# over pre-tokenised, pre-batched input.
# Needs: cargo, nvcc (scripts/cuda-toolkit.sh installs one on Debian), python3 with venv and the
# package registries once (torch, transformers, tokenizers).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
copies="${1:-40}"
work=target/gpu-bench
mkdir -p "$work"

command -v nvidia-smi >/dev/null || { echo "gpu-bench: no nvidia-smi: no GPU here" >&2; exit 2; }
card=$(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader | head -n 1)
echo "card: $card"
command -v nvcc >/dev/null || bash scripts/cuda-toolkit.sh
# nvcc 11.x has no compute_90a, which candle asks for on 90; PTX for 80 runs on newer cards.
cap=$(echo "$card" | awk -F', ' '{gsub(/\./, "", $2); print $2}')
nvcc_major=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
if [ "$cap" -ge 90 ] && [ "${nvcc_major:-0}" -lt 12 ]; then cap=80; fi
export CUDA_COMPUTE_CAP="$cap"
echo "building for compute capability $CUDA_COMPUTE_CAP with nvcc $nvcc_major"

bash models/fetch.sh >/dev/null
cargo build --release --features cuda --examples --tests
THEMESCAN_REQUIRE_GPU=1 cargo test --release --features cuda --test gpu -- --nocapture 2>&1 |
  tee "$work/tests.log" | grep -E "min cos|test result|panicked" || true
grep -q "test result: ok" "$work/tests.log" || { echo "gpu-bench: GPU tests failed" >&2; exit 1; }

dense=target/e5-small-dense
[ -f "$dense/model.safetensors" ] || cargo run --release --features cuda --quiet --example export -- --out "$dense"
input="$work/input.jsonl"
for _ in $(seq "$copies"); do cat benches/data/news.jsonl; done >"$input"

venv="$work/venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q torch transformers tokenizers safetensors

themescan() {  # DTYPE -> tokens/s (median of 3 runs, each after the model is loaded)
  for _ in 1 2 3; do
    ./target/release/examples/embed --input "$input" --output /dev/null --device cuda \
      --model "$dense" --dtype "$1" --batch-tokens 16384 2>&1 |
      sed -n 's/.*(\([0-9]*\) tokens\/s).*/\1/p'
  done | sort -n | sed -n 2p
}
ts_f32=$(themescan f32)
ts_bf16=$(themescan bf16)
torch() {
  HF_HUB_OFFLINE=1 "$venv/bin/python" benches/gpu/torch_bench.py --model "$dense" \
    --input "$input" --dtype "$1" | awk '{print $(NF-1)}'
}
pt_f32=$(torch fp32)
pt_bf16=$(torch bf16)

echo
echo "encoder tokens/s on $card, $(wc -l <"$input") texts (news.jsonl x $copies)"
printf '| engine | tokens/s | ratio to PyTorch bf16 |\n| --- | ---: | ---: |\n'
for row in "themescan f32:$ts_f32" "themescan bf16:$ts_bf16" "PyTorch fp32 SDPA:$pt_f32" "PyTorch bf16 SDPA:$pt_bf16"; do
  name=${row%%:*}; v=${row##*:}
  printf '| %s | %s | %.2f |\n' "$name" "$v" "$(echo "$v / $pt_bf16" | bc -l)"
done
