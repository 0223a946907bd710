"""Training-step time and peak memory of every registered method, relative to finetune.

    python benchmarks/overhead.py [--device cpu|cuda] [--configs enc-32x128,enc-8x256,dec-2x256]
                                  [--methods all] [--budget-s 540] [--json PATH] [--peak-tflops 989]
                                  [--encoder-model minilm-l6] [--decoder-model smollm2-135m] [--compile-loss]

Configurations (same model, batch and sequence length for every method of a configuration):

* `enc-32x128`: MiniLM-L6 (`minilm-l6`) on GLUE RTE, batch 32 x 128 tokens;
* `enc-8x256`:  MiniLM-L6 on GLUE RTE, batch 8 x 256 tokens;
* `dec-2x256`:  SmolLM2-135M (`smollm2-135m`) with the default LoRA adapter on GSM8K, batch 2 x 256 tokens
  (the vocabulary-map path: the soft targets of random_dlb and dynsdpb are vocabulary maps, VMM).

The step is the recipe's own `Recipe.train_step` (`raysdpb.recipe`), between the loader's work (collate the
batch, move it to the device) and the loop's bookkeeping (`EpochStats.add`): the forward pass, `LogitCache.take`
of the first half, `method.loss`, the finiteness check, backward, gradient clipping (max_grad_norm 1.0), AdamW
(fused where the device has it), the linear schedule, `zero_grad`, `LogitCache.put` of the second half's soft
targets. Each method's recipe is set up from the same trial config (its method replaced), so the recipe's
precision rules apply on CUDA (bf16 autocast; a decoder's weights loaded in bf16). Left out: TensorBoard
scalars (every 10 steps) and per-layer gradient norms (every 50 steps), the loop's logging, the same for every
method.

Fair comparison on a shared machine: every method has its own model copy (identical initial weights; LoRA
copies share the frozen base weights), optimizer, sampler and cache, and all methods step round-robin (one
step each per round, the order rotating every round), so a noisy neighbour slows all of them alike. At step k
every method sees the same token tensors (batch k of one shuffled stream, padded to the full length), so
differences come from the method alone; the `index` of the batch comes from the method's own sampler (the
overlap sampler for the DLB methods), which the cache checks as in the recipe. Step time is the median over
the timed rounds (after warm-up); `step_time_ratio` is the method's median over finetune's, and
`paired_ratio` the median of the per-round ratios (with their interquartile range). CPU time (all threads of
the process) is reported too: it counts work, not waiting, so it is steadier when the CPUs are shared.

Peak memory is the peak of live tensor memory during one training step, the equivalent of
`torch.cuda.max_memory_allocated`: what the step holds when it starts (parameters, buffers, optimizer state,
the cached soft targets; counted from the tensors themselves) plus the largest increase of live tensor
memory during the step. On CPU the increase comes from the allocation and free events of
`torch.profiler(profile_memory=True)` (their running sum); on CUDA from `max_memory_allocated` minus
`memory_allocated` at the start of the step. Process RSS is not used: it includes ~1 GB of libraries, other
methods' models in this process, and memory the C allocator keeps after frees, which all blur the ratio.

The same profiled step gives the operators' self times (`profile` in the JSON); phases of every timed step
(data, forward, loss_backward, optimizer, schedule_cache, bookkeeping: their boundaries come from hooks on the
model's forward and the optimizer's step, not from a copy of the step) are timed on CPU, where kernels are
synchronous (on CUDA only with `--phases`, which adds synchronisations).

Tokens/s count padded tokens (batch x length); MFU = 6 x parameters (all, frozen included) x tokens/s over
`--peak-tflops` (default on CUDA: 989, H100/H200 bf16 dense; none on CPU unless given).
`trial_cost_ratio` also counts how many steps a 3-epoch trial of the method takes on the configuration's
task (the overlap sampler takes about twice as many steps per epoch, double_finetune twice the epochs).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, Clock, default_peak, machine_info, median, mfu, offline_env, quantile,  # noqa: E402
                     quiet_libraries, table, write_json)

offline_env()

import torch  # noqa: E402

CONFIGS = {
    "enc-32x128": dict(model="minilm-l6", task="glue/rte", kind="classification", batch=32, length=128),
    "enc-8x256": dict(model="minilm-l6", task="glue/rte", kind="classification", batch=8, length=256),
    "dec-2x256": dict(model="smollm2-135m", task="nlg/gsm8k", kind="generation", batch=2, length=256, lora=True),
}
# the targets for dynsdpb against finetune: (step time, peak memory)
TARGETS = {"classification": (1.05, 1.02), "generation": (1.10, 1.10)}
# share of the time budget per configuration (what one leaves is carried over)
BUDGET_SHARE = {"enc-32x128": 0.3, "enc-8x256": 0.2, "dec-2x256": 0.5}
# the boundaries: the batch on the device; the model's forward done; the optimizer's step begins (loss, backward,
# clipping before it); its step done; train_step returned (schedule, zero_grad, the soft targets cached); the loop's
# bookkeeping done
PHASES = ("data", "forward", "loss_backward", "optimizer", "schedule_cache", "bookkeeping")
TRIAL_EPOCHS = 3


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


@dataclass
class Setup:
    name: str
    spec: dict
    config: object  # the TrialConfig every method's recipe starts from (its method replaced)
    device: torch.device
    kind: str
    tokenizer: object
    base: torch.nn.Module
    params: int
    trainable: int
    dataset: object
    collator: object
    train_size: int
    load_s: float


def trial_config(spec: dict, args, seed: int = 0):
    """The trial the benchmark's steps belong to (the method is set per runner)."""
    from raysdpb.config import LoraConfig, TrialConfig

    return TrialConfig(task=spec["task"], model=spec["model"], method="finetune", alpha=1.0, tau=2.0, lr=5e-5,
                       weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0, batch_size=spec["batch"],
                       max_length=spec["length"], epochs=TRIAL_EPOCHS, seed=seed, precision=args.precision,
                       device="cuda" if args.device.startswith("cuda") else "cpu",
                       lora=LoraConfig() if spec.get("lora") else None,
                       gradient_checkpointing=args.gradient_checkpointing, compile_loss=args.compile_loss,
                       progress_bar=False,
                       grad_norm_every_steps=10**9)  # per-layer norms are the loop's logging, the same for all


def build_setup(name: str, spec: dict, args) -> Setup:
    """The data and the base model, once per configuration, through the recipe's own set-up (its device, precision
    and dtype rules, its model builder)."""
    from raysdpb.data import collate, tokenize_records
    from raysdpb.recipe import Recipe
    from raysdpb.tasks import data_dir_from, load_examples

    t0 = time.perf_counter()
    proto = Recipe(trial_config(spec, args, seed=args.seed))
    base = proto.load_model().to(proto.device)
    task = proto.task
    records = load_examples(task, task.train_split, data_dir_from(None))
    train_size = len(records)
    # enough distinct samples for every step of the run (the overlap sampler needs at least one batch)
    n = min(len(records), max(spec["batch"] * (args.max_steps + 8) * 2, 4 * spec["batch"]))
    dataset = tokenize_records(records[:n], task.kind, proto.tokenizer, spec["length"], name=f"{name}:{task.name}")
    params = sum(p.numel() for p in base.parameters())
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad)
    # every batch padded to exactly `length` tokens (all items are at most that long after truncation)
    collator = collate(proto.tokenizer.pad_token_id, pad_to_multiple_of=spec["length"])
    return Setup(name, spec, proto.cfg, proto.device, task.kind, proto.tokenizer, base, params, trainable, dataset,
                 collator, train_size, time.perf_counter() - t0)


def _batches_of(sampler):
    """The sampler's batches over successive epochs (what the recipe's loop walks through)."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from sampler


class MethodRunner:
    """One method's recipe (its own model copy, optimizer, schedule, sampler and cache) and its timed steps."""

    def __init__(self, method_name: str, setup: Setup) -> None:
        from raysdpb.recipe import Recipe

        self.name = method_name
        self.setup = setup
        self.recipe = recipe = Recipe(setup.config.model_copy(update={"method": method_name}))
        self.method = recipe.method
        recipe.setup_runtime()
        recipe.tokenizer = setup.tokenizer
        recipe.setup_data(setup.dataset, [])
        # a copy with the same initial weights; frozen (LoRA base) weights are shared, not copied
        frozen = {id(p): p for p in setup.base.parameters() if not p.requires_grad}
        recipe.setup_model(copy.deepcopy(setup.base, memo=frozen))
        recipe.model.train()
        recipe.setup_loader(setup.collator)
        recipe.setup_optimization()
        batch = setup.spec["batch"]
        self.indices = (b for b in _batches_of(recipe.sampler) if len(b) == batch)
        # full-size samplers of the task: steps of a 3-epoch trial
        from raysdpb.recipe.components import make_sampler

        full = make_sampler(self.method, setup.train_size, batch, seed=setup.config.seed)
        self.trial_steps = full.total_batches(TRIAL_EPOCHS * self.method.epoch_multiplier)
        self.steps_per_epoch = full.batches_in_epoch(1)
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.phases: dict[str, list[float]] = {p: [] for p in PHASES}
        self.memory: dict = {}
        self.profile: list[dict] = []
        self.ops: dict[str, dict] = {}
        self.profiled_steps = 0
        # phase boundaries inside the recipe's train_step, from hooks (no change to the step itself): the end of
        # the model's forward, and the optimizer's step
        self._marks: list[float] | None = None
        def mark(*_):
            self._mark()

        recipe.train_model.register_forward_hook(mark)
        recipe.optimizer.register_step_pre_hook(mark)
        recipe.optimizer.register_step_post_hook(mark)

    def _mark(self) -> None:
        if self._marks is not None:
            if self.setup.device.type == "cuda":
                torch.cuda.synchronize(self.setup.device)
            self._marks.append(time.perf_counter())

    def resident_bytes(self) -> int:
        """Tensors the step holds when it starts: parameters, buffers, optimizer state, cached soft targets."""
        r = self.recipe
        tensors = list(r.model.parameters()) + list(r.model.buffers())
        for state in r.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        cached = r.cache.state_dict()
        return _storage_bytes(tensors) + _storage_bytes(cached.values())

    def step(self, content: list[int], timed_phases: bool) -> tuple[float, float, dict]:
        """One `Recipe.train_step` on the items `content` (with this method's own sampler indices), after the
        loader's work (fetch the items, collate) and before the loop's bookkeeping; returns (wall s, CPU s, phase
        seconds)."""
        s, dev = self.setup, self.setup.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        sync()
        clock = Clock()
        self._marks = [time.perf_counter()] if timed_phases else None
        batch = s.collator([s.dataset[i] for i in content])
        batch["index"] = torch.tensor(next(self.indices), dtype=torch.long)
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        self._mark()
        terms = self.recipe.train_step(batch)
        assert terms is not None, f"{self.name}: non-finite loss"
        self._mark()
        self.recipe.epoch_stats.add(terms)  # float() of the loss terms: a synchronisation on CUDA, as in the loop
        sync()
        end = time.perf_counter()
        wall, cpu = clock.elapsed()
        phases = {}
        if timed_phases:
            marks = self._marks + [end]
            phases = {p: b - a for p, a, b in zip(PHASES, marks, marks[1:])}
        self._marks = None
        return wall, cpu, phases


def profiled_step(runner: MethodRunner, content: list[int], top: int) -> None:
    """One step under torch.profiler: peak live tensor memory and the operators' self times."""
    from torch.profiler import ProfilerActivity, profile

    dev = runner.setup.device
    resident = runner.resident_bytes()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
    with profile(activities=activities, profile_memory=True) as prof:
        runner.step(content, timed_phases=False)
    if dev.type == "cuda":
        increase = torch.cuda.max_memory_allocated(dev) - start
    else:
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        events.sort(key=lambda e: e.start_ns())
        live, increase = 0, 0
        for e in events:
            live += e.nbytes()
            increase = max(increase, live)
    if runner.memory and runner.memory["peak_bytes"] >= resident + increase:
        pass  # keep the larger peak of several profiled steps
    else:
        runner.memory = {"resident_bytes": resident, "step_increase_bytes": int(increase),
                         "peak_bytes": int(resident + increase)}
    device_time = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    # operators' self times, averaged per step over the profiled steps
    runner.profiled_steps += 1
    for a in prof.key_averages():
        o = runner.ops.setdefault(a.key, {"op": a.key, "count": 0, "self_cpu_ms": 0.0,
                                          "self_device_ms": 0.0 if dev.type == "cuda" else None})
        o["count"] += a.count
        o["self_cpu_ms"] += a.self_cpu_time_total / 1e3
        if dev.type == "cuda":
            o["self_device_ms"] += getattr(a, device_time, 0.0) / 1e3
    n = runner.profiled_steps
    ops = [{**o, "count": o["count"] / n, "self_cpu_ms": o["self_cpu_ms"] / n,
            "self_device_ms": o["self_device_ms"] / n if o["self_device_ms"] is not None else None}
           for o in runner.ops.values()]
    ops.sort(key=lambda o: -(o["self_device_ms"] if dev.type == "cuda" else o["self_cpu_ms"]))
    runner.profile = ops


def run_config(name: str, args, budget_s: float) -> dict:
    from raysdpb.methods import METHODS

    device = torch.device(args.device)
    t_start = time.perf_counter()
    model = args.decoder_model if CONFIGS[name]["kind"] == "generation" else args.encoder_model
    spec = dict(CONFIGS[name], model=model)
    setup = build_setup(name, spec, args)
    # all: every method that trains without a teacher folder (kd's step is finetune's plus a table lookup)
    methods = ([m for m in METHODS if METHODS[m].soft_targets != "teacher"] if args.methods == "all"
               else args.methods.split(","))
    if "finetune" not in methods:
        methods.insert(0, "finetune")
    runners = [MethodRunner(m, setup) for m in methods]
    batch = setup.spec["batch"]
    from raysdpb.sampler import ShuffledBatchSampler

    content_stream = (b for b in _batches_of(ShuffledBatchSampler(len(setup.dataset), batch, shuffle=True, seed=1234))
                      if len(b) == batch)
    phases_on = device.type == "cpu" or args.phases
    print(f"[{name}] {setup.spec['model']} {setup.spec['task']} batch {batch} x {setup.spec['length']} on {device}: "
          f"{setup.params / 1e6:.1f}M parameters ({setup.trainable / 1e6:.2f}M trained); set-up {setup.load_s:.0f}s; "
          f"budget {budget_s:.0f}s", flush=True)

    rounds = 0
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cpu" else 3)
    if args.compile_loss and args.warmup is None:
        warmup = max(warmup, 3)  # the compilations (no teacher on the first step, then with one) before the timing

    def one_round(kind: str) -> None:
        nonlocal rounds
        content = next(content_stream)
        k = rounds % len(runners)
        order = runners[k:] + runners[:k]  # rotate, so no method is always first or last in a round
        walls = {}
        for r in order:
            if kind == "profile":
                profiled_step(r, content, args.top)
            else:
                wall, cpu, ph = r.step(content, timed_phases=phases_on)
                if kind == "timed":
                    r.wall.append(wall)
                    r.cpu.append(cpu)
                    for p, v in ph.items():
                        r.phases[p].append(v)
                walls[r.name] = wall
        rounds += 1
        if kind == "timed" and args.verbose:
            print(f"  round {rounds}: " + " ".join(f"{m}={w:.2f}s" for m, w in walls.items()), flush=True)

    for _ in range(warmup):  # also gives every distilling method a cached teacher state
        one_round("warmup")
    for _ in range(args.profile_steps):
        one_round("profile")
    timed = 0
    while timed < args.max_steps and (timed < args.min_steps or time.perf_counter() - t_start < budget_s):
        one_round("timed")
        timed += 1
    elapsed = time.perf_counter() - t_start

    base = runners[0]
    tokens = batch * setup.spec["length"]
    peak = default_peak(args.device, args.peak_tflops)
    rows = []
    for r in runners:
        step_s, cpu_s = median(r.wall), median(r.cpu)
        paired = [w / b for w, b in zip(r.wall, base.wall)]
        row = {
            "method": r.name, "steps": len(r.wall), "step_s": step_s, "cpu_s": cpu_s,
            "step_time_ratio": step_s / median(base.wall), "cpu_time_ratio": cpu_s / median(base.cpu),
            "paired_ratio": median(paired), "paired_ratio_q25": quantile(paired, 0.25),
            "paired_ratio_q75": quantile(paired, 0.75),
            "peak_mib": r.memory["peak_bytes"] / 2**20,
            "peak_memory_ratio": r.memory["peak_bytes"] / base.memory["peak_bytes"],
            "resident_mib": r.memory["resident_bytes"] / 2**20,
            "step_increase_mib": r.memory["step_increase_bytes"] / 2**20,
            "tokens_per_s": tokens / step_s, "mfu": mfu(setup.base, tokens / step_s, peak),
            "steps_per_epoch": r.steps_per_epoch, "trial_steps": r.trial_steps,
            "trial_cost_ratio": (step_s * r.trial_steps) / (median(base.wall) * base.trial_steps),
            "phases_ms": {p: median(v) * 1e3 for p, v in r.phases.items() if v},
            "step_seconds": r.wall, "cpu_seconds": r.cpu,
        }
        rows.append(row)
    by_method = {row["method"]: row for row in rows}
    result = {"model": setup.spec["model"], "task": setup.spec["task"], "batch": batch, "length": setup.spec["length"],
              "lora": bool(setup.spec.get("lora")), "params": setup.params, "trainable_params": setup.trainable,
              "setup_s": setup.load_s, "elapsed_s": elapsed, "timed_rounds": timed, "warmup_rounds": warmup,
              "profiled_rounds": args.profile_steps,
              "peak_tflops": peak, "methods": by_method}
    step_target, mem_target = TARGETS[setup.kind]
    if "dynsdpb" in by_method:
        d = by_method["dynsdpb"]
        result["targets"] = {
            "step_time_ratio": {"target": step_target, "value": d["step_time_ratio"],
                                "met": d["step_time_ratio"] <= step_target},
            "peak_memory_ratio": {"target": mem_target, "value": d["peak_memory_ratio"],
                                  "met": d["peak_memory_ratio"] <= mem_target},
        }
    # where dynsdpb's extra time goes: operators whose self time grew the most against finetune
    if "dynsdpb" in by_method:
        key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
        ft = {o["op"]: o[key] or 0.0 for o in base.profile}
        dyn = next(r for r in runners if r.name == "dynsdpb")
        diff = [{"op": o["op"], "dynsdpb_ms": o[key] or 0.0, "finetune_ms": ft.get(o["op"], 0.0),
                 "extra_ms": (o[key] or 0.0) - ft.get(o["op"], 0.0)} for o in dyn.profile]
        diff.sort(key=lambda o: -o["extra_ms"])
        result["profile"] = {"finetune_top": base.profile[:args.top], "dynsdpb_top": dyn.profile[:args.top],
                             "dynsdpb_extra_top": diff[:args.top]}
    _print_config(name, result, rows, phases_on, device)
    # free this configuration's models before the next one
    runners.clear()  # (one_round holds the list too)
    del setup
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _print_config(name: str, result: dict, rows: list[dict], phases_on: bool, device) -> None:
    print(f"\n== {name}: {result['model']} on {result['task']}, batch {result['batch']} x {result['length']}"
          f"{' (LoRA)' if result['lora'] else ''}; {result['timed_rounds']} timed rounds after "
          f"{result['warmup_rounds']} warm-up + {result['profiled_rounds']} profiled; {result['elapsed_s']:.0f}s")
    cols = [("method", "method", ""), ("steps", "n", "d"), ("step_s", "step_s", ".3f"),
            ("step_time_ratio", "time_ratio", ".3f"), ("paired_ratio", "paired", ".3f"),
            ("paired_ratio_q25", "q25", ".3f"), ("paired_ratio_q75", "q75", ".3f"),
            ("cpu_time_ratio", "cpu_ratio", ".3f"), ("peak_mib", "peak_MiB", ".1f"),
            ("peak_memory_ratio", "mem_ratio", ".4f"), ("tokens_per_s", "tok/s", ".0f"),
            ("mfu", "MFU", ".4f"), ("trial_steps", "trial_steps", "d"), ("trial_cost_ratio", "trial_cost", ".2f")]
    print(table(rows, cols))
    if phases_on:
        prow = [{"method": r["method"], **r["phases_ms"]} for r in rows]
        print("median phase times (ms): " + ("synchronised" if device.type == "cuda" else "CPU, synchronous"))
        print(table(prow, [("method", "method", "")] + [(p, p, ".1f") for p in PHASES]))
    for what, t in result.get("targets", {}).items():
        print(f"target dynsdpb {what} <= {t['target']:.2f}: {t['value']:.4f} -> {'MET' if t['met'] else 'MISSED'}")
    prof = result.get("profile")
    if prof:
        print(f"operators whose self time grew most in dynsdpb's profiled steps (per step, over "
              f"{result['profiled_rounds']} profiled step(s) each; shared operators' differences are mostly noise):")
        print(table(prof["dynsdpb_extra_top"][:8], [("op", "op", ""), ("finetune_ms", "finetune_ms", ".1f"),
                                                     ("dynsdpb_ms", "dynsdpb_ms", ".1f"),
                                                     ("extra_ms", "extra_ms", ".1f")]))
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the recipe's precision setting (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--methods", default="all", help="'all' or comma-separated method names (finetune is always added)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget for all configurations together (set-up included); the timed rounds "
                        "stop when a configuration's share is spent, after at least --min-steps")
    p.add_argument("--min-steps", type=int, default=3, help="timed steps per method at least")
    p.add_argument("--max-steps", type=int, default=None, help="timed steps per method at most (cpu 20, cuda 50)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (cpu 1, cuda 3)")
    p.add_argument("--phases", action="store_true", help="time the phases of each step on CUDA too (synchronises)")
    p.add_argument("--profile-steps", type=int, default=1,
                   help="profiled rounds (peak memory: the largest; operator times: averaged)")
    p.add_argument("--top", type=int, default=15, help="operators kept per profile")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for MFU in TFLOP/s (default: 989 on CUDA, H100/H200 bf16 dense; none on CPU)")
    p.add_argument("--encoder-model", default="minilm-l6",
                   help="the model of the enc-* configurations: an alias, a local HF folder or a hub id")
    p.add_argument("--decoder-model", default="smollm2-135m",
                   help="the model of dec-2x256 (LLaMA-family, with LoRA): an alias, a local HF folder or a hub id")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every method with the trial option gradient_checkpointing: true (less activation memory)")
    p.add_argument("--compile-loss", action="store_true",
                   help="every method with the trial option compile_loss: true (torch.compile of the method's loss; "
                        "at least 3 warm-up rounds unless --warmup says otherwise: they take the compilations)")
    p.add_argument("--json", default=None, help=f"write the figures here (e.g. {RESULTS / 'overhead.json'})")
    p.add_argument("-v", "--verbose", action="store_true", help="print every timed round")
    args = p.parse_args()
    if args.max_steps is None:
        args.max_steps = 50 if args.device.startswith("cuda") else 20
    quiet_libraries()
    torch.manual_seed(args.seed)
    names = [c for c in args.configs.split(",") if c]
    for c in names:
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}; choose from {', '.join(CONFIGS)}")
    results = {"benchmark": "overhead", "device": args.device, "precision": args.precision,
               "gradient_checkpointing": args.gradient_checkpointing, "compile_loss": args.compile_loss,
               "machine": machine_info(), "budget_s": args.budget_s, "configs": {}}
    t0 = time.perf_counter()
    shares = {c: BUDGET_SHARE.get(c, 1.0) for c in names}
    for i, c in enumerate(names):
        left = args.budget_s - (time.perf_counter() - t0)
        share = shares[c] / sum(shares[n] for n in names[i:])
        results["configs"][c] = run_config(c, args, max(left * share, 0.0))
    results["elapsed_s"] = time.perf_counter() - t0
    summary = []
    for c, r in results["configs"].items():
        for what, t in r.get("targets", {}).items():
            summary.append({"config": c, "what": what, "target": t["target"], "value": t["value"],
                            "met": "MET" if t["met"] else "MISSED"})
    if summary:
        print("== dynsdpb against finetune")
        print(table(summary, [("config", "config", ""), ("what", "ratio", ""), ("target", "target", ".2f"),
                              ("value", "value", ".4f"), ("met", "", "")]))
    print(f"total {results['elapsed_s']:.0f}s")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
