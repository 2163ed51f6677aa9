"""Training: the loop (``loop``) and what it is built from — optimizer and schedule, checkpoints
and resuming, launching several processes, collectives, signals, tracking."""
