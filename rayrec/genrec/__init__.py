"""Generative recommendation: semantic IDs, prompt datasets, the SFT job's inputs, the LoRA SFT
trainer, constrained decoding, evaluation. The ``sft`` recipe (``rayrec.recipes.sft``) runs them.

Submodules import torch/transformers lazily where they can; import the one you need
(``rayrec.genrec.semantic_ids``, ``...prompts``, ``...inputs``, ``...sft``, ``...constrained``, ``...evaluate``).
"""
