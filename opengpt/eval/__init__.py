"""Evaluation of models: perplexity over held text (perplexity.py) and HumanEval pass@k, programs run in the sandbox (humaneval.py)."""
