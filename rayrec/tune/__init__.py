"""Tuning sweeps: search-space files -> Ray Tune (Optuna, ASHA) over Ray Train trials."""
