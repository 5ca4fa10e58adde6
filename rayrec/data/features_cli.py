"""`rayrec data features JOB.yaml`: compute (or confirm up to date) a ur4rec job's features."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``features`` under the existing ``data`` command."""
    data = sub.choices["data"]
    dsub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    f = dsub.add_parser("features", help="text/image embeddings of a ur4rec job (cached)")
    f.add_argument("job", type=Path, help="a ur4rec job YAML (its model.features section)")
    f.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.features.text_model=hash:256")
    f.add_argument("--local", action="store_true", help="encode in this process instead of Ray Data")
    f.add_argument("--force", action="store_true", help="rewrite the feature files even if up to date")
    f.set_defaults(func=cmd_data_features)
    dsub.metavar = "{prepare,synth,info,features}"


def cmd_data_features(args: argparse.Namespace) -> int:
    from rayrec.cluster import gpu_available, shared_paths
    from rayrec.config import load_job
    from rayrec.data.dataset import ensure_prepared
    from rayrec.data.features import compute_features, manifest_summary, num_users_of
    from rayrec.errors import ConfigError
    from rayrec.prefs.generate import prefs_out_dir

    cfg = shared_paths(load_job(args.job, args.overrides))
    if not hasattr(cfg.model, "features"):  # only the joint model has a model.features section
        raise ConfigError(f"{args.job}: data features reads model.features of a ur4rec job, this job's model is "
                          f"'{cfg.model.name}'")
    ds = ensure_prepared(cfg.data)
    if not args.local:
        from rayrec.cluster import ensure_ray

        ensure_ray()
    manifest = compute_features(cfg.model.features, ds.path, num_users_of(ds.path),
                                prefs_dir=prefs_out_dir(cfg.model.prefs, ds.path), use_ray=not args.local,
                                use_gpu=cfg.scaling.use_gpu and gpu_available(not args.local), force=args.force)
    print(json.dumps(manifest_summary(manifest), indent=2))
    return 0
