"""Evaluation of kvjax cache policies: zero-shot multiple choice (`python -m eval`) and perplexity
(`python -m eval.perplexity`), both scored through the exact teacher-forced path."""
