"""`cram pretrain`: the budgeted trainer (loop, schedules, budget clock, checkpoints, DDP)."""
