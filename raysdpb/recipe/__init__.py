"""The training recipe and what it runs on: `recipe.py` (set-up, `train_step`, `evaluate`, state, `train`),
`components.py` (the pieces it is set up from), `evaluation.py`, `progress.py` (what it reports),
`checkpoint.py` (what a checkpoint holds and when it is whole) and `context.py` (where it runs)."""

from raysdpb.recipe.progress import TrialResult
from raysdpb.recipe.recipe import Recipe, forward_outputs, recipe_class, run_trial

__all__ = ["Recipe", "TrialResult", "forward_outputs", "recipe_class", "run_trial"]
