"""Explanations of recommended items: templates now; LLM text, cache and queue later."""
