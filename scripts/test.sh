#!/usr/bin/env bash
# Installs raysdpb with its test dependencies (scripts/setup.sh), lints, and runs the default test suite.
# Tests read the data from ../shared/data (or $RAYSDPB_TEST_DATA) and never touch the network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RAY_USAGE_STATS_ENABLED=0
# lint first (a second): pyflakes and pycodestyle as pyproject.toml's [tool.ruff] selects them
python3 -m ruff check --quiet .
# the 25 slowest tests at the end of every run: the suite must stay under 15 minutes on 2 cores
python3 -m pytest -q --durations=25 "$@"
