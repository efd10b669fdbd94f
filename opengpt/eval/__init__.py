"""Evaluation of models: perplexity over held text (perplexity.py); benchmarks of tasks come later."""
