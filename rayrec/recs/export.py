"""``rayrec export``: a trained run as an MLflow pyfunc model, registered under a name and an alias.

The model is logged from code (``rayrec/recs/served.py``, not a pickled class) into the run's own
MLflow run (found by its run folder, or the adapter's recorded run id), with the bundle of
``rayrec.recs.bundle`` as its one artifact, rayrec's code beside it (``code_paths``), a signature
(``user_id`` and/or ``history`` in; params ``k`` and ``include_seen``; ``recommend``'s rows out) and
explicit ``pip_requirements`` (pinned to this environment, so logging never resolves packages
online). The tracking URI is the job's (credentials from the environment, never stored).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rayrec.errors import ConfigError, RayrecError

log = logging.getLogger(__name__)

ARTIFACT = "model"


@dataclass(frozen=True)
class Exported:
    name: str
    version: str
    alias: str | None
    model_uri: str  # models:/NAME@ALIAS, or models:/NAME/VERSION
    run_id: str
    tracking_uri: str  # redacted


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec(DataType.string, "user_id", required=False),
                     ColSpec(Array(DataType.string), "history", required=False)])
    outputs = Schema([ColSpec(DataType.string, "user_id"), ColSpec(DataType.long, "rank"),
                      ColSpec(DataType.string, "item_id"), ColSpec(DataType.double, "score")])
    params = ParamSchema([ParamSpec("k", DataType.long, 10), ParamSpec("include_seen", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def requirements(kind: str) -> list[str]:
    """The packages the served model imports, pinned to the versions installed here."""
    from importlib.metadata import version

    names = ["mlflow", "torch", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml"]
    if kind == "beams":
        names += ["transformers", "peft", "safetensors", "tokenizers"]
    return [f"{n}=={version(n)}" for n in names]


def export(run: Path | str, name: str, alias: str | None = None, *, job: Path | None = None,
           tracking_uri: str | None = None) -> Exported:
    import mlflow
    from mlflow.tracking import MlflowClient

    import rayrec
    from rayrec.recs.bundle import write_bundle
    from rayrec.recs.recommend import Request, plan_for
    from rayrec.secrets import redact_uri
    from rayrec.tracking.mlflow_tracking import check_reachable, resolve_uri

    if not name or "/" in name or "@" in name:
        raise ConfigError(f"--name {name!r}: a registered model name has no '/' or '@'")
    plan = plan_for(Request(run, 1, job=job))
    cfg = plan.cfg
    uri = resolve_uri(tracking_uri or cfg.tracking.uri)
    check_reachable(uri)
    client = MlflowClient(uri)
    run_id = training_run(client, cfg, Path(plan.meta["checkpoint"]))
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory(prefix="rayrec-export-") as tmp:
        bundle = Path(tmp) / "bundle"
        info = write_bundle(plan, bundle)
        opened = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(
            experiment_id=_experiment(client, cfg.tracking.experiment), run_name=f"export-{name}")
        with opened as active, _quiet_mlflow():
            logged = mlflow.pyfunc.log_model(
                name=ARTIFACT, python_model=str(Path(rayrec.__file__).parent / "recs" / "served.py"),
                artifacts={"bundle": str(bundle)}, code_paths=[str(Path(rayrec.__file__).parent)],
                signature=signature(), pip_requirements=requirements(info["kind"]), registered_model_name=name)
            mlflow.set_tags({"rayrec.export.name": name, "rayrec.export.checkpoint": plan.meta["checkpoint"]})
            run_id = active.info.run_id
    version = str(logged.registered_model_version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    model_uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    log.debug("exported %s as %s (run %s)", plan.meta["checkpoint"], model_uri, run_id)
    return Exported(name, version, alias, model_uri, run_id, redact_uri(uri))


@contextmanager
def _quiet_mlflow():
    """No progress bars, registry chatter or input-example advice from MLflow on the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logger = logging.getLogger("mlflow")
    before = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example.*")
            yield
    finally:
        logger.setLevel(before)


def training_run(client, cfg, checkpoint: Path) -> str | None:
    """The MLflow run that trained ``checkpoint`` (adapters record it; a run folder is tagged on its run)."""
    import json

    from rayrec.genrec.lm import META_FILE
    from rayrec.tracking.mlflow_tracking import RUN_KEY_TAG

    meta = checkpoint / META_FILE
    if meta.is_file():
        run_id = json.loads(meta.read_text()).get("mlflow_run_id")
        try:  # it may live in another tracking store than the one exported to
            return client.get_run(run_id).info.run_id if run_id else None
        except Exception:
            return None
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return None
    from rayrec.storage import home_uri

    for folder in (checkpoint.parent, checkpoint.parent.resolve(), home_uri(checkpoint.parent)):  # (a copy of) a run
        if folder is None:
            continue
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{folder}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0].info.run_id
    return None


def _experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise RayrecError(f"MLflow experiment '{name}' is deleted: restore it or export with another tracking.experiment")
    return exp.experiment_id if exp else client.create_experiment(name)
