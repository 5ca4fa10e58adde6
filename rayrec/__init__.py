"""rayrec: a Ray-based scalable trainer and hyperparameter tuner for recommendation models."""

__version__ = "0.1.0"
