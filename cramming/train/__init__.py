"""`cram pretrain`: the budgeted MLM trainer.

- `trainer`: the Hydra entry point (`run`) and the auto-prepare of missing data;
- `loop`: `pretrain()`, the loop as small functions over a `TrainState`;
- `config`: `TrainConfig` (train.*); `budget`: the budget clock; `state`: what a checkpoint
  carries; `checkpoint`: atomic checkpoints and the run lock; `inputs`: data, maskers, loaders;
  `runlog`: metrics, progress bar, summary and plot; `signals`: SIGTERM/SIGINT; `distributed`: DDP.

The optimizer, precision and schedules are shared with GLUE in `cramming.optim`.
"""
