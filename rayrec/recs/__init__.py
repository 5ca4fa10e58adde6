"""Recommendations out of a trained run: top-K lists for users (``recommend``) and their metrics
against a prepared split (``evaluate``)."""
