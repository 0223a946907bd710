#!/usr/bin/env bash
# Installs raysdpb (scripts/setup.sh) and runs the quickstart sweep: MiniLM-L6 on SuperGLUE CB,
# finetune vs random_dlb vs dynsdpb over a small lr/alpha grid, on a local Ray instance.
# With no network, RAYSDPB_DATA_DIR must point at a local mirror of the data (default: ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${RAYSDPB_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
    export RAYSDPB_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_USAGE_STATS_ENABLED=0
python3 -m raysdpb.sweep sweeps/quickstart.yaml "$@"
