"""The evaluation suite (`python -m eval`), issue #6: not implemented yet."""
