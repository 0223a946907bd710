#!/usr/bin/env bash
# The ASHA replays of protocol v2's stage-1 grids, as committed (benchmarks/results/asha_replay_<task>_v2*.json,
# RESULTS.md): every method's grid ran to the end, so ASHA's decisions can be replayed offline (asha_replay.py).
#
#     bash benchmarks/asha_replay_v2.sh cb|mrpc|cola|sst2 [OUT_PREFIX]   # default: benchmarks/results/asha_replay
#
# Per task (each method's grid, in the run's order): rungs in training samples seen (grace at the first reports:
# half, one and two epochs on CB, MRPC; one and two on CoLA, SST-2, which report once per finetune epoch),
# reductions 2 / 3 / 4, two trials at a time as the run,
# each configuration chosen by its last report (protocol v2's rule); per method (`_v2`), one ASHA over the task
# (`_v2_whole`), in epochs (`_v2_epochs`), and where every grid records the dev loss (CoLA, SST-2) ASHA on the loss
# judged by the metric (`_v2_loss`, `_v2_loss_whole`). The regret is stated in dev examples (Matthews on CoLA: one
# example is about 2.8 / 200 = 0.014, `--example-worth`). Seconds of CPU each.
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:?"usage: bash benchmarks/asha_replay_v2.sh cb|mrpc|cola|sst2 [OUT_PREFIX]"}
OUT=${2:-benchmarks/results/asha_replay}
PY=${PYTHON:-python}
case $TASK in
  cb)   TASK_ID=superglue/cb; GRACE="100 200 400"; EPOCHS="0.5 1"; DEV=50; WORTH=(); LOSS="";;
  mrpc) TASK_ID=glue/mrpc; GRACE="400 800 1200"; EPOCHS="0.5 1"; DEV=200; WORTH=(); LOSS="";;
  cola) TASK_ID=glue/cola; GRACE="1500 3000"; EPOCHS="0.5 1"; DEV=200; WORTH=(--example-worth 0.014)
        LOSS=eval_dev_matthews;;
  sst2) TASK_ID=glue/sst2; GRACE="1000 2000"; EPOCHS="1 2"; DEV=200; WORTH=(); LOSS=eval_dev_accuracy;;
  *) echo "asha_replay_v2.sh: unknown task $TASK (cb, mrpc, cola, sst2)" >&2; exit 2;;
esac
# the methods' grids (quality_v2.grid_name) in the order the run trained them (quality_v2.V2_METHODS): the simulated
# sweep starts its trials in the order given, two at a time, and ASHA's decisions depend on the order reports arrive
mapfile -t GRIDS < <("$PY" -c "
import sys
from pathlib import Path
sys.path.insert(0, 'benchmarks')
from quality_v2 import V2_METHODS, grid_name
for m in V2_METHODS:
    d = Path('benchmarks/results/quality-v2') / grid_name('$TASK_ID', m)
    if d.is_dir():
        print(d)")
if [ ${#GRIDS[@]} -eq 0 ]; then
    echo "asha_replay_v2.sh: no archived stage-1 grids of $TASK under benchmarks/results/quality-v2" >&2; exit 1
fi
REPLAY=("$PY" benchmarks/asha_replay.py "${GRIDS[@]}" --select last --concurrent 2 --reduction 2 3 4
        --eval-examples "$DEV" "${WORTH[@]}")
"${REPLAY[@]}" --time-attr samples_seen --grace $GRACE --json "${OUT}_${TASK}_v2.json"
"${REPLAY[@]}" --time-attr samples_seen --grace $GRACE --one-sweep --group-by task --json "${OUT}_${TASK}_v2_whole.json"
"${REPLAY[@]}" --time-attr epoch --grace $EPOCHS --json "${OUT}_${TASK}_v2_epochs.json"
if [ -n "$LOSS" ]; then
    LOSS_REPLAY=("${REPLAY[@]}" --time-attr samples_seen --grace $GRACE --metric eval_dev_loss --mode min
                 --score-metric "$LOSS")
    "${LOSS_REPLAY[@]}" --json "${OUT}_${TASK}_v2_loss.json"
    "${LOSS_REPLAY[@]}" --one-sweep --group-by task --json "${OUT}_${TASK}_v2_loss_whole.json"
fi
