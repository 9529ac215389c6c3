"""Training one fold, built from parts that can be used and tested alone.

- ``data``: table -> folds -> cache -> loaders (``build_loaders`` is what benchmarks use)
- ``state``: model, optimiser, schedule, scaler, EMA; resume; ``best.pt`` / ``last.pt``
- ``records``: ``summary.csv`` and the out-of-fold probabilities
- ``hooks``: the epoch loop's extras (summary and trackers, checkpoints, OOF maps,
  averaging), each an ``EpochHook``; ``run_training(..., hooks=[...])`` adds one
- ``fold``: ``run_training``, the orchestration and the epoch loop

Works on CPU (float32) and CUDA (AMP, channels_last), on one device or under torchrun
(DistributedDataParallel; rank 0 writes files, metrics are reduced across ranks). The
run folder's layout is ``bonecomp.runs``'s.
"""

from bonecomp.training.fold import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
