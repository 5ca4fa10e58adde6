"""Experiment tracking (MLflow) and the figures logged with runs."""
