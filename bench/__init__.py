"""Reproducible benchmarks; `python -m bench NAME` runs one and prints its figures as one JSON line."""
