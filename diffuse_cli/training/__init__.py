"""Training: the loop, one optimisation step, the time budget, many processes (DDP), the mirror probe, run folders
and the text and plot a run shows."""
