#!/usr/bin/env bash
# The GPU check with Ray: raysdpb's sweeps (Ray Tune + Ray Train) on the lent GPU machine, whose image has torch,
# transformers, peft and pyarrow but not Ray, pydantic or datasets, and no network. Two modes:
#
#   bash scripts/gpu_ray_check.sh prepare [ASSETS]        # here, with network: fills ASSETS (default .gpu_ray)
#   bash scripts/gpu_ray_check.sh run [OUT] [ASSETS]      # there: installs the wheels, runs the sweeps
#   bash scripts/gpu_ray_check.sh efficiency [OUT] [ASSETS]   # there: issue 33's step and GPU-share figures
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
# efficiency: issue 33's GPU figures, after the same install, in about 4 minutes: MiniLM-L6's architecture with
#   random weights (it times as the real one), then benchmarks/overhead.py (enc-32x128, finetune and dynsdpb, eager
#   and with compile_loss: DynSDPB's step against finetune's, target within 2%) and benchmarks/gpu_share.py (1, 2,
#   4 and 8 trial processes on the GPU: the measured default for gpus_per_worker). OUT gets overhead.json,
#   overhead_compiled.json, gpu_share.json and efficiency.log. GPU_EFF_SECONDS (default 15) is each share's timed
#   window, GPU_EFF_BUDGET_S (default 60) each overhead run's budget; GPU_RAY_DEVICE=cpu rehearses it.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
usage() {  # the comment above, up to its first blank line
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
}
install_assets() {  # the wheels with pip, then the tarballs (Ray's: gpu_ray_wheels.wheel_to_tarball) into $SITE,
                    # put on the path with the checkout, offline
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$ASSETS"/wheels/*.whl || { echo "gpu_ray_check: installing the wheels failed"; exit 3; }
    for tarball in "$ASSETS"/wheels/*.tar.xz; do
        [ -e "$tarball" ] || continue
        tar -xJf "$tarball" -C "$SITE" || { echo "gpu_ray_check: unpacking $tarball failed"; exit 3; }
    done
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
        RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
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
    install_assets
    echo "== wheels installed into $SITE after $((SECONDS - t0)) s"
    LIMIT=${GPU_RAY_LIMIT_S:-$([ "$DEVICE" = cuda ] && echo 480 || echo 2000)}
    timeout --kill-after=20 "$LIMIT" "$PY" scripts/gpu_ray_driver.py run --assets "$ASSETS" \
        --out "$OUT" --device "$DEVICE"
    rc=$?
    echo "== gpu ray check: exit $rc after $((SECONDS - t0)) s"
    exit "$rc"
    ;;
efficiency)
    OUT=${2:-gpu_eff_out}
    ASSETS=${3:-.gpu_ray}
    DEVICE=${GPU_RAY_DEVICE:-cuda}
    SITE=${GPU_RAY_SITE:-/tmp/gpu-ray-site}
    if ! ls "$ASSETS"/wheels/*.whl >/dev/null 2>&1 || [ ! -d "$ASSETS/data/glue/rte" ]; then
        echo "gpu_ray_check: no wheels or no glue/rte in $ASSETS: run 'bash scripts/gpu_ray_check.sh prepare' and carry $ASSETS" >&2
        exit 2
    fi
    mkdir -p "$OUT"
    exec > >(tee "$OUT/efficiency.log") 2>&1
    t0=$SECONDS
    install_assets
    export RAYSDPB_DATA_DIR="$(cd "$ASSETS" && pwd)/data"
    MODEL=${TMPDIR:-/tmp}/gpu-eff-minilm
    if [ "$DEVICE" = cuda ]; then SHARES="1 2 4 8" SECONDS_EACH=${GPU_EFF_SECONDS:-15} BUDGET=${GPU_EFF_BUDGET_S:-60}
        SMALL=()
    else  # the rehearsal: the same steps on a small BERT (tiny-bert), a few steps each
        SHARES="1 2" SECONDS_EACH=2 BUDGET=20 SMALL=(--max-steps 2 --min-steps 1 --warmup 1) MODEL=tiny-bert
    fi
    failed=0
    step() {  # name limit command...: one step, its own time limit, counted when it fails
        local name=$1 limit=$2; shift 2
        echo "== $name (limit ${limit} s) after $((SECONDS - t0)) s"
        timeout --kill-after=10 "$limit" "$@" || { echo "== $name failed ($?)"; failed=$((failed + 1)); }
    }
    [ "$DEVICE" = cuda ] && step model 120 "$PY" scripts/gpu_ray_driver.py model --assets "$ASSETS" --dest "$MODEL"
    step overhead $((BUDGET + 90)) "$PY" benchmarks/overhead.py --device "$DEVICE" --configs enc-32x128 \
        --methods finetune,dynsdpb --budget-s "$BUDGET" --encoder-model "$MODEL" "${SMALL[@]}" \
        --json "$OUT/overhead.json"
    step overhead_compiled $((BUDGET + 150)) "$PY" benchmarks/overhead.py --device "$DEVICE" --configs enc-32x128 \
        --methods finetune,dynsdpb --budget-s "$BUDGET" --encoder-model "$MODEL" --compile-loss "${SMALL[@]}" \
        --json "$OUT/overhead_compiled.json"
    step gpu_share 400 "$PY" benchmarks/gpu_share.py --device "$DEVICE" --shares $SHARES --seconds "$SECONDS_EACH" \
        --encoder-model "$MODEL" --json "$OUT/gpu_share.json"
    echo "== efficiency: $failed step(s) failed, $((SECONDS - t0)) s"
    exit "$failed"
    ;;
*)
    usage
    exit 2
    ;;
esac
