"""Training: recipes, data, the loop, checkpoints and multi-process setup (see trainer.py)."""
