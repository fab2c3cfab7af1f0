#!/usr/bin/env bash
# Install m3i's built-in data sets into the data cache, from the package registries.
#
#   scripts/fetch_data.sh [fashion-mnist] [emoji] [digits]     (default: all three)
#
# The same as `m3i data fetch` (src/m3i/data/fetch.py), for a clone: Fashion-MNIST from the Debian
# package dataset-fashion-mnist (apt-get download + dpkg -x, no root needed), the emoji from the npm
# package emoji-datasource-google@16.0.0 (npm pack), the UCI digits as one file of the scikit-learn
# wheel (pip download). Cache: $M3I_DATA if set, else ~/.cache/m3i. A set already in place is kept.
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
py="${M3I_PYTHON:-python3}"  # a Python with m3i's dependencies and pip (the Makefile passes its virtual environment's)
PYTHONPATH="$here/src${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m m3i.cli data fetch "$@"
