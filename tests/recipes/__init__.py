"""Pinned reference runs of every recipe, and a smoke test over every registered model."""
