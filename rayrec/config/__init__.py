"""Typed job configs: schema, loading with dotted overrides, and clear errors."""

from rayrec.config.loader import config_paths, dump_job, flatten, load_job, load_model
from rayrec.config.schema import JobConfig

__all__ = ["JobConfig", "config_paths", "dump_job", "flatten", "load_job", "load_model"]
