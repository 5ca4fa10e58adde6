"""Evaluation: ranking metrics (full and sampled)."""
