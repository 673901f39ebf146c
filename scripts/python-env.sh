#!/usr/bin/env bash
# Sets up what the Python package and its Spark tests need, then installs the package:
# Java from the machine (a headless OpenJDK 17 from Debian's archive where it is missing), the
# pinned pyspark, pyarrow, pytest and maturin from PyPI, and `pip install ./python`.
#
#   bash scripts/python-env.sh && python3 -m pytest python/tests -q
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v java >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
fi
echo "java: $(java -version 2>&1 | head -n 1)"

python3 -m pip install --quiet --disable-pip-version-check \
  "maturin==1.9.6" "pyarrow==21.0.0" "pyspark==3.5.7" "pandas==2.2.3" "pytest==8.3.5" "numpy>=1.21"
# Its own target folder: the wheel's dependencies are built with other features than the
# crate's tests, and sharing one folder would rebuild them back and forth.
CARGO_TARGET_DIR="${THEMESCAN_PYTHON_TARGET:-$PWD/python/target}" \
  python3 -m pip install --quiet --disable-pip-version-check ./python
python3 -c "import themescan; print('themescan', themescan.__file__)"
