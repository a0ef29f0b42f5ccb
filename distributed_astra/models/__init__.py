"""Causal LMs: loading, tracked-module selection, the loss conventions, and the tiny GPT-2 used by the demo."""
