"""The one training loop and what it needs: each member's batches, the stacked optimiser, the
graphed step, checkpoints, history, progress and placement; the training-data interface."""
