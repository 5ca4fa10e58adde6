"""How the commands read a sequential job file (the generative ones: ``genrec._job``)."""

from __future__ import annotations

import argparse

from rayrec.errors import ConfigError


def sequential_job(args: argparse.Namespace, *, shared: bool = True):
    """``args.job`` with ``args.overrides``, validated as a sequential job (a job of another kind is
    an error naming its command); with ``shared``, its relative paths under the shared storage root."""
    from rayrec.cluster import shared_paths
    from rayrec.config.kinds import SEQUENTIAL, load_job_file

    cfg = load_job_file(args.job, args.overrides, expect=(SEQUENTIAL,))
    return shared_paths(cfg) if shared else cfg


def joint_job(args: argparse.Namespace, section: str, command: str):
    """A sequential job whose model has ``model.<section>`` (only the joint model has ``features``
    and ``prefs``)."""
    cfg = sequential_job(args)
    if not hasattr(cfg.model, section):
        raise ConfigError(f"{args.job}: {command} reads model.{section} of a ur4rec job, this job's model is "
                          f"'{cfg.model.name}'")
    return cfg
