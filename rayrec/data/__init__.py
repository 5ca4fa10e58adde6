"""Data: raw sources, preparation into the data contract, and streaming batches."""
