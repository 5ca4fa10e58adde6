"""rayrec: a Ray-based scalable trainer and hyperparameter tuner for recommendation models.

How a job runs: the CLI (``rayrec.cli``) loads a job file, looks up its recipe
(``rayrec.recipes``: ``sequential``, ``joint``, ``sft``) and hands both to the one driver,
``rayrec.runs.run_job``, which owns storage, the run folder, MLflow, the ``TorchTrainer``
and the console. Recipes compose library parts: ``train`` (framework-free loops),
``genrec`` (semantic IDs, prompts, the SFT trainer), ``models``, ``strategies``, ``data``,
``eval`` and ``tracking``; inside Ray Train workers they use ``rayrec.workers``. Sweeps
(``rayrec.tune``) run each trial through the same driver.
"""

__version__ = "0.1.0"
