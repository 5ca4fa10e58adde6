"""Tuning sweeps: search-space files -> Ray Tune (Optuna, ASHA); each trial runs its job through
the one driver (``rayrec.runs.run_job``) with the recipe its kind names (``rayrec.config.kinds``)."""
