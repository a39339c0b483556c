"""Training: run config, schedules, the loop, checkpoints."""
