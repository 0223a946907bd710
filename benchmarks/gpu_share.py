"""How many small-model trials one GPU should hold (issue 33): the measured default for `gpus_per_worker`.

    python benchmarks/gpu_share.py [--device cuda] [--shares 1 2 4 8] [--seconds 30] [--method finetune]
                                   [--config enc-32x128] [--encoder-model minilm-l6] [--json OUT]

Ray's fractional GPUs (`sweep.gpus_per_worker: 1/k`, one worker per trial) put k trial processes on one GPU; what
that buys is the GPU's combined training throughput with k processes against one. For each k in `--shares`, k
processes are started at once (spawned, each with its own CUDA context, as k Ray workers would be); each builds the
configuration's model and data through `benchmarks/overhead.py`'s set-up (`build_setup`, `MethodRunner`: the
recipe's own `Recipe.train_step`, its precision rules, bf16 autocast on CUDA), takes `--warmup` steps, waits for the
others (a barrier, so that the timed windows overlap), then steps for `--seconds` and reports its steps, tokens and
peak memory (`torch.cuda.max_memory_allocated`). Reported per k: the combined tokens/s (the sum of each process's
padded tokens over its own timed seconds), that against k = 1, the median step time per process, the largest peak
memory and the combined MFU (`--peak-tflops`, default on CUDA 989: H100/H200 bf16 dense).

The recommendation (`recommend`): the smallest k whose combined throughput is within `--tolerance` (default 5%)
of the best k's, among the k whose every process ran (a k that ran out of memory, or whose process failed, is
reported with its error and not chosen): `gpus_per_worker` = 1 / k. More processes than that add memory and
contention for no throughput. Scope: the training step only (a trial also evaluates, checkpoints and starts up,
which leave the GPU idler, so a real sweep gains at least this much from sharing); one model size per run
(`--encoder-model`: MiniLM-L6, or a local folder of that shape with random weights, which times the same).

`--device cpu` runs the same on the CPU (a rehearsal of the script: threads split between the processes, numbers
meaningless for a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_peak, machine_info, offline_env, table, write_json  # noqa: E402

offline_env()

__all__ = ["recommend", "combine", "main"]


# --- the arithmetic (pure) -------------------------------------------------------------------------------------

def combine(workers: list[dict], peak_tflops: float | None = None, flops_per_token: float | None = None) -> dict:
    """One k's figures from its processes' reports (`tokens`, `seconds`, `steps`, `step_s`, `peak_mib`, or `error`):
    combined tokens/s = the sum of each process's tokens / its seconds; MFU = that x FLOPs a token / peak."""
    errors = [w["error"] for w in workers if w.get("error")]
    if errors:
        return {"k": len(workers), "ok": False, "errors": errors}
    tokens_per_s = sum(w["tokens"] / w["seconds"] for w in workers)
    out = {"k": len(workers), "ok": True, "tokens_per_s": tokens_per_s,
           "step_ms_median": 1e3 * statistics.median(w["step_s"] for w in workers),
           "peak_mib_max": max(w["peak_mib"] for w in workers), "steps": [w["steps"] for w in workers]}
    from raysdpb.throughput import mfu

    out["mfu"] = mfu(tokens_per_s, flops_per_token, peak_tflops * 1e12) if peak_tflops and flops_per_token else None
    return out


def recommend(results: list[dict], tolerance: float = 0.05) -> int | None:
    """The smallest k whose combined tokens/s is within `tolerance` of the best k's, among the k that ran whole
    (None when none did)."""
    ran = [r for r in results if r.get("ok")]
    if not ran:
        return None
    best = max(r["tokens_per_s"] for r in ran)
    return min(r["k"] for r in ran if r["tokens_per_s"] >= (1.0 - tolerance) * best)


# --- one process ---------------------------------------------------------------------------------------------

def worker(index: int, args: argparse.Namespace, barrier, results) -> None:
    """Build, warm up, wait for the others, step for `args.seconds`; put this process's report on `results`."""
    report: dict = {"index": index}
    try:
        import torch

        import overhead

        spec = dict(overhead.CONFIGS[args.config], model=args.encoder_model)
        setup = overhead.build_setup(args.config, spec, args)
        runner = overhead.MethodRunner(args.method, setup)
        from raysdpb.sampler import ShuffledBatchSampler

        batch = spec["batch"]
        stream = (b for b in overhead._batches_of(ShuffledBatchSampler(len(setup.dataset), batch, shuffle=True,
                                                                         seed=1234 + index)) if len(b) == batch)
        for _ in range(args.warmup):
            runner.step(next(stream), timed_phases=False)
        cuda = setup.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(setup.device)
        from raysdpb.throughput import matmul_parameters, train_flops_per_token

        report["flops_per_token"] = train_flops_per_token(*matmul_parameters(setup.base))
        barrier.wait(timeout=args.barrier_timeout_s)
        walls, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < args.seconds or not walls:
            wall, _, _ = runner.step(next(stream), timed_phases=False)
            walls.append(wall)
        seconds = time.perf_counter() - t0
        report |= {"steps": len(walls), "seconds": seconds, "tokens": len(walls) * batch * spec["length"],
                   "step_s": statistics.median(walls),
                   "peak_mib": (torch.cuda.max_memory_allocated(setup.device) / 2**20 if cuda
                                else runner.resident_bytes() / 2**20)}
    except BaseException as e:  # noqa: BLE001 - out of memory is a result here, not a crash
        report["error"] = f"{type(e).__name__}: {e}"[:500]
        try:
            barrier.abort()  # the others must not wait for this one
        except Exception:  # noqa: BLE001
            pass
    results.put(report)


def run_share(k: int, args) -> dict:
    """k processes at once on the device; their combined figures."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, args, barrier, results)) for i in range(k)]
    for p in procs:
        p.start()
    reports = []
    deadline = time.monotonic() + args.barrier_timeout_s + args.seconds + 120
    while len(reports) < k and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=5))
        except Exception:  # noqa: BLE001 - queue.Empty: look whether a process died without a report
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    missing = k - len(reports)
    reports += [{"error": "the process ended without a report (killed: out of host memory?)"}] * missing
    flops = next((r["flops_per_token"] for r in reports if r.get("flops_per_token")), None)
    out = combine(reports, default_peak(args.device, args.peak_tflops), flops)
    out["workers"] = reports
    return out


def main(argv: list[str] | None = None) -> dict:
    import overhead

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu (a rehearsal)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--shares", type=int, nargs="+", default=[1, 2, 4, 8], help="processes per GPU to measure")
    p.add_argument("--seconds", type=float, default=30.0, help="timed seconds per process")
    p.add_argument("--warmup", type=int, default=5, help="steps before the barrier")
    p.add_argument("--method", default="finetune")
    p.add_argument("--config", default="enc-32x128", choices=[c for c, s in overhead.CONFIGS.items()
                                                              if s["kind"] == "classification"])
    p.add_argument("--encoder-model", default="minilm-l6", help="an alias, or a local HF folder")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--barrier-timeout-s", type=float, default=300.0, help="how long the set-up of k may take")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    # what overhead.build_setup and MethodRunner read
    args.max_steps, args.seed, args.gradient_checkpointing, args.compile_loss = 50, 0, False, False
    t0 = time.perf_counter()
    results = []
    for k in args.shares:
        r = run_share(k, args)
        results.append(r)
        what = (f"{r['tokens_per_s']:,.0f} tokens/s combined, step {r['step_ms_median']:.1f} ms, peak "
                f"{r['peak_mib_max']:,.0f} MiB" if r["ok"] else "failed: " + "; ".join(r["errors"])[:300])
        print(f"[k={k}] {what}", flush=True)
    base = next((r for r in results if r["ok"] and r["k"] == 1), None)
    for r in results:
        r["vs_one"] = r["tokens_per_s"] / base["tokens_per_s"] if r["ok"] and base else None
    k = recommend(results, args.tolerance)
    print(table([r for r in results if r["ok"]], [("k", "processes", "d"), ("tokens_per_s", "tokens/s", ",.0f"),
                                                  ("vs_one", "vs one", ".2f"), ("step_ms_median", "step ms", ".1f"),
                                                  ("peak_mib_max", "peak MiB", ",.0f"), ("mfu", "MFU", ".3f")]))
    print(f"recommended: gpus_per_worker {1 / k:g} ({k} trial{'s' if k > 1 else ''} a GPU)" if k
          else "no share ran whole")
    out = {"benchmark": "gpu_share", "device": args.device, "config": args.config, "method": args.method,
           "model": args.encoder_model, "seconds": args.seconds, "machine": machine_info(), "results": results,
           "recommended_k": k, "recommended_gpus_per_worker": 1 / k if k else None, "tolerance": args.tolerance,
           "elapsed_s": time.perf_counter() - t0}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["recommended_k"] else 1)  # no share ran whole: a failed measurement
