"""Evaluation of kvjax cache policies: perplexity now; zero-shot tasks and the report come next (issue #6)."""
