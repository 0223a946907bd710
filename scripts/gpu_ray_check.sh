#!/usr/bin/env bash
# The GPU check with Ray: raysdpb's sweeps (Ray Tune + Ray Train) on the lent GPU machine, whose image has torch,
# transformers, peft and pyarrow but not Ray, pydantic or datasets, and no network. Two modes:
#
#   bash scripts/gpu_ray_check.sh prepare [ASSETS]        # here, with network: fills ASSETS (default .gpu_ray)
#   bash scripts/gpu_ray_check.sh run [OUT] [ASSETS]      # there: installs the wheels, runs the sweeps
#
# prepare: the wheels the image lacks for Python $GPU_RAY_PYTHON (default 3.12, the image's), Ray's stripped
#   (scripts/gpu_ray_wheels.py), the model's architecture and tokenizer files and SuperGLUE CB
#   (scripts/gpu_ray_driver.py assets), then the size a device call would send (the working tree and ASSETS, under
#   its 64 MiB). ASSETS is ignored by git (.gitignore): give it to the device call as `carry`.
# run: installs ASSETS/wheels into $GPU_RAY_SITE (default /tmp/gpu-ray-site) with pip --no-index --no-deps, puts
#   it and this checkout on PYTHONPATH, saves nvidia-smi, then scripts/gpu_ray_driver.py run: a 6-trial grid with
#   ASHA and bf16, a killed worker that resumes, DDP over NCCL where there are two GPUs. OUT (default
#   gpu_ray_out) gets run.log, nvidia-smi.txt, summary.json, results.tar.gz and ray_logs.tar.gz (at most 8 files:
#   what a device call brings back). The exit status is the driver's: the number of failed checks.
#   GPU_RAY_DEVICE=cpu runs the same on the CPU (no GPU, fp32, a small model): the rehearsal.
#   GPU_RAY_LIMIT_S (default 480; 2000 on the CPU) bounds the driver; its own deadline (420 s; 1800) the sweeps.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
usage() {  # the comment above, up to its first blank line
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
}
mode=${1:-}
case "$mode" in
prepare)
    ASSETS=${2:-.gpu_ray}
    set -e
    "$PY" scripts/gpu_ray_wheels.py --dest "$ASSETS/wheels" --python-version "${GPU_RAY_PYTHON:-3.12}" \
        ${GPU_RAY_DOWNLOADS:+--downloads "$GPU_RAY_DOWNLOADS"}
    "$PY" scripts/gpu_ray_driver.py assets --assets "$ASSETS"
    if git check-ignore -q "$ASSETS/wheels"; then :; else
        echo "gpu_ray_check: $ASSETS is not ignored by git: it would travel twice (as the tree and as carry)" >&2
        exit 1
    fi
    "$PY" scripts/gpu_ray_driver.py travel-size --carry "$ASSETS"
    echo "prepared: give the device call carry=[\"$ASSETS\"]"
    ;;
run)
    OUT=${2:-gpu_ray_out}
    ASSETS=${3:-.gpu_ray}
    DEVICE=${GPU_RAY_DEVICE:-cuda}
    SITE=${GPU_RAY_SITE:-/tmp/gpu-ray-site}
    if ! ls "$ASSETS"/wheels/*.whl >/dev/null 2>&1; then
        echo "gpu_ray_check: no wheels in $ASSETS/wheels: run 'bash scripts/gpu_ray_check.sh prepare' and carry $ASSETS" >&2
        exit 2
    fi
    mkdir -p "$OUT"
    exec > >(tee "$OUT/run.log") 2>&1
    t0=$SECONDS
    echo "== gpu ray check on $(hostname), $(date -u +%FT%TZ), device $DEVICE, python $("$PY" -c 'import sys; print(sys.version.split()[0])')"
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (see nvidia-smi.txt)"
        head -n 12 "$OUT/nvidia-smi.txt"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$ASSETS"/wheels/*.whl || { echo "gpu_ray_check: installing the wheels failed"; exit 3; }
    echo "== wheels installed into $SITE after $((SECONDS - t0)) s"
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
    LIMIT=${GPU_RAY_LIMIT_S:-$([ "$DEVICE" = cuda ] && echo 480 || echo 2000)}
    timeout --kill-after=20 "$LIMIT" "$PY" scripts/gpu_ray_driver.py run --assets "$ASSETS" \
        --out "$OUT" --device "$DEVICE"
    rc=$?
    echo "== gpu ray check: exit $rc after $((SECONDS - t0)) s"
    exit "$rc"
    ;;
*)
    usage
    exit 2
    ;;
esac
