"""Raw data sources: each name maps to a reader ``read(input, *, on_bad_line, **options) -> RawData``.

Looked up by ``data.source`` of a job file; ``data.source_options`` are passed
to the reader as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

from rayrec.data.sources.amazon import read_amazon
from rayrec.data.sources.base import RawData
from rayrec.data.sources.generic import read_interactions_table
from rayrec.data.sources.minionerec import read_minionerec
from rayrec.data.sources.movielens import read_movielens_1m, read_movielens_100k
from rayrec.data.sources.multimodal_movielens import read_movielens_multimodal
from rayrec.data.sources.recbole import read_recbole
from rayrec.data.sources.synthetic import generate_synthetic

SOURCES: dict[str, Callable[..., RawData]] = {
    "movielens-100k": read_movielens_100k,
    "movielens-1m": read_movielens_1m,
    "movielens-multimodal": read_movielens_multimodal,
    "recbole": read_recbole,
    "csv": read_interactions_table,
    "minionerec": read_minionerec,
    "amazon": read_amazon,
    # Generates instead of reading: keyword-only parameters, no ``input``.
    "synthetic": generate_synthetic,
}
