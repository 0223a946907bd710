"""One trial in one process, for debugging and for machines without Ray:

    python -m raysdpb.train CONFIG [key=value ...] [--output-dir DIR] [--resume latest|CHECKPOINT_DIR]

A searched key (`search:` in the config) takes its first value unless overridden. TensorBoard events and
checkpoints go to `output_dir` (default `runs/<task>_<model>_<method>_seed<seed>`); `loggers: [mlflow, wandb]`
also logs the run to MLflow and Weights & Biases (`raysdpb.trackers`). The last line of
stdout is the final evaluation as one JSON object (`eval_<metric>`, `method`, `task`, `seed`, `status`).
Importing this module loads no Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raysdpb.errors import run_cli


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysdpb.train", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a YAML config (e.g. sweeps/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=random_dlb lr=3e-5 seed=1")
    p.add_argument("--output-dir", default=None, help="where TensorBoard events and checkpoints go")
    p.add_argument("--resume", default=None,
                   help="'latest' (newest checkpoint in the output dir) or a checkpoint folder")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from raysdpb.config import load_trial_config

    overrides = list(args.overrides)
    if args.quiet:
        overrides.append("progress_bar=false")
    config = load_trial_config(args.config, overrides)
    output_dir = args.output_dir or config.output_dir or os.path.join("runs", config.run_name())

    from raysdpb.recipe import run_trial
    from raysdpb.recipe.context import LocalContext
    from raysdpb.trackers import open_local_trackers

    context = LocalContext(output_dir, resume_from=args.resume, keep=args.keep_checkpoints)  # may refuse the folder
    trackers = context.trackers = open_local_trackers(config, output_dir, resume=args.resume is not None,
                                                      source=args.config)
    try:
        result = run_trial(config, context)
    except BaseException as err:
        if trackers is not None:
            trackers.finish("interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
        raise
    if trackers is not None:
        trackers.finish(result.status)
    print(result.summary_line(config), flush=True)
    if result.status == "diverged":
        print(f"raysdpb: trial diverged: {result.message}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
