"""The training stack below both training stages (pretraining and GLUE finetuning).

- `schedules`: learning-rate, batch and random-LTD schedules as pure functions of progress, and a
  `LambdaLR` wrapper for per-step schedulers;
- `groups`: AdamW with its weight-decay groups and the fused-kernel choice;
- `precision`: autocast and the gradient scaler for a (device, precision) pair.

Floor 2 of the package: these modules import only torch, `cramming.errors` and the standard
library (no Hydra, no stage), so both stages share them without importing each other.
"""
