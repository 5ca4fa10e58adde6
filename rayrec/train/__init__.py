"""Training: the framework-free loop, checkpoints, and the Ray Train wiring."""
