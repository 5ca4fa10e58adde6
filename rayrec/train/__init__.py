"""Training loops that run without Ray: the sequential ``fit`` and the joint model's staged
``fit_joint``, checkpoints, and the local runner. Ray enters only through arguments (batches,
all-reduce, reporter); the recipes in ``rayrec.recipes`` wire them into Ray Train workers."""
