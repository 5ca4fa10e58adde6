"""Generative recommendation: semantic IDs, prompt datasets, LoRA SFT, constrained decoding, evaluation.

Submodules import torch/transformers lazily where they can; import the one you need
(``rayrec.genrec.semantic_ids``, ``...prompts``, ``...sft``, ``...constrained``, ``...evaluate``).
"""
