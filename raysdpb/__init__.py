"""raysdpb: DynSDPB self-distillation from previous mini-batches, as Ray Train/Tune sweeps.

Import the pieces from their modules (`raysdpb.sampler`, `raysdpb.losses`, `raysdpb.methods`, ...);
this package imports nothing heavy on its own, so `python -m raysdpb.train` starts fast and never loads Ray.
"""

__version__ = "0.1.0"
