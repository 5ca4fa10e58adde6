"""Starting or joining Ray, checking that a job fits the cluster, and the cluster's shared paths."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayrec.config.schema import JobConfig
from rayrec.errors import ClusterError
from rayrec.storage import is_object_uri

log = logging.getLogger(__name__)

#: CPUs left free for Ray Data's read/map tasks; without them a run hangs silently.
DATA_CPU_RESERVE = 1.0
#: Where Ray's state API looks for the dashboard (it overrides auto-detection).
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
#: Ray Train's worker-group start timeout (seconds), read by its controller.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
#: Shared folder under which a job's relative data and run paths live on a cluster.
STORAGE_ROOT_ENV = "RAYREC_STORAGE_ROOT"
#: Resources an autoscaling cluster can grow to, declared by the cluster itself (JSON).
MAX_RESOURCES_ENV = "RAYREC_MAX_RESOURCES"
#: The cluster launcher's config as written on the head node (where job drivers run).
LAUNCHER_CONFIG = Path("~/ray_bootstrap_config.yaml")
AUTOSCALE_HINT = f" (autoscaling cluster? declare its limits in {MAX_RESOURCES_ENV}, see cluster/README.md)"


def quiet_ray_data() -> None:
    """One progress bar per epoch is ours; Ray Data's own bars and banners would drown it."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def ensure_ray(num_cpus: int | None = None, include_dashboard: bool = True) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit sets it) or start a local Ray.

    The dashboard (ray[default]) backs the state API that Ray Train uses to clean up
    placement groups; without it the controller warns every few seconds.
    """
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        with state_api_pinned(include_dashboard) as port:
            ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, dashboard_port=port,
                     log_to_driver=True, logging_level=logging.WARNING)


@contextmanager
def state_api_pinned(enabled: bool = True):
    """Yield a free dashboard port, exported as RAY_API_SERVER_ADDRESS while Ray starts.

    The Ray processes started meanwhile inherit it, so the state API (Train's placement-group
    cleaner) talks to this Ray even when another Ray instance runs on the same host; without
    it, it fails with "Found multiple active Ray instances" and a stopped trial's workers are
    never freed. The variable is removed again so that this process's own subprocesses
    (e.g. `ray job submit --address ...`) are not redirected.
    """
    if not enabled:
        yield None
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = os.environ.get(STATE_API_ENV)
    os.environ[STATE_API_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        if old is None:
            os.environ.pop(STATE_API_ENV, None)
        else:
            os.environ[STATE_API_ENV] = old


def cluster_capacity(bootstrap: Path = LAUNCHER_CONFIG) -> dict[str, float]:
    """The most of each resource the cluster can ever have.

    That is what is there now, or more where an autoscaler may add nodes (GPU nodes at
    ``min_workers: 0`` are absent until a job asks): its maximum as reported to the GCS,
    as configured in the cluster launcher's bootstrap file, or as declared by the cluster
    in ``$RAYREC_MAX_RESOURCES`` (KubeRay: the autoscaler's limits are not visible to jobs).
    """
    import ray
    from ray._private.state import state

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        reported = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:  # no autoscaler config in the GCS
        reported = {}
    sources = [now, reported, launcher_capacity(bootstrap), declared_capacity()]
    return {k: max(src.get(k, 0.0) for src in sources) for k in set().union(*sources)}


def declared_capacity() -> dict[str, float]:
    """``$RAYREC_MAX_RESOURCES`` as a dict, e.g. ``{"CPU": 360, "GPU": 32}`` (cluster/kuberay/*.yaml)."""
    raw = os.environ.get(MAX_RESOURCES_ENV, "").strip()
    if not raw:
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(raw).items()}
    except (ValueError, AttributeError, TypeError):
        raise ClusterError(f"{MAX_RESOURCES_ENV}={raw!r} is not a JSON object of resource amounts, "
                           'e.g. {"CPU": 360, "GPU": 32}') from None


def launcher_capacity(config: Path) -> dict[str, float]:
    """Resources of a cluster-launcher config at full size: the head plus every worker type at
    its ``max_workers`` (an upper bound: the global ``max_workers`` may cap the sum)."""
    import yaml

    path = config.expanduser()
    if not path.is_file():
        return {}
    cfg = yaml.safe_load(path.read_text()) or {}
    total: dict[str, float] = {}
    for name, node in (cfg.get("available_node_types") or {}).items():
        count = 1 if name == cfg.get("head_node_type") else int(node.get("max_workers", cfg.get("max_workers", 0)))
        for k, v in (node.get("resources") or {}).items():
            total[k] = total.get(k, 0.0) + count * float(v)
    return total


def gpu_available(use_ray: bool) -> bool:
    """A GPU for the encoder: anywhere in the Ray cluster (the actor is placed there), else locally."""
    if use_ray:
        import ray

        return ray.cluster_resources().get("GPU", 0.0) >= 1.0
    import torch

    return torch.cuda.is_available()


def worker_resources(cfg: JobConfig) -> dict[str, float]:
    """What one Ray Train worker reserves (Ray's defaults: 1 CPU, or 1 GPU when ``use_gpu``)."""
    sc = cfg.scaling
    res = {k: float(v) for k, v in sc.resources_per_worker.items()}
    res.setdefault("CPU", 0.0 if sc.use_gpu else 1.0)
    if sc.use_gpu:
        res.setdefault("GPU", 1.0)
    return res


def preflight(cfg: JobConfig) -> None:
    """Fail in seconds, stating the shortfall, when the job can never be placed."""
    total = cluster_capacity()
    n, each = cfg.scaling.num_workers, worker_resources(cfg)
    if cfg.scaling.use_gpu and total.get("GPU", 0.0) < n * each["GPU"]:
        raise ClusterError(f"scaling.use_gpu=true needs {n * each['GPU']:g} GPUs for {n} workers, the cluster has "
                           f"{total.get('GPU', 0.0):g} (at most); set scaling.use_gpu=false or add GPU nodes{AUTOSCALE_HINT}")
    have_cpu = float(total.get("CPU", 0.0))
    if n * each["CPU"] > have_cpu - DATA_CPU_RESERVE:
        raise ClusterError(
            f"scaling asks for {n} workers x {each['CPU']:g} CPU = {n * each['CPU']:g} CPUs, but the cluster "
            f"has {have_cpu:g} (at most) and Ray Data needs {DATA_CPU_RESERVE:g} free; lower scaling.num_workers or set "
            f"scaling.resources_per_worker.CPU={max(0.25, (have_cpu - DATA_CPU_RESERVE) / n):g}{AUTOSCALE_HINT}"
        )
    for key, amount in each.items():
        if key not in ("CPU", "GPU") and n * amount > total.get(key, 0.0):
            raise ClusterError(
                f"scaling.resources_per_worker.{key}={amount:g} x {n} workers = {n * amount:g}, but the cluster "
                f"has {total.get(key, 0.0):g} {key} (at most); lower scaling.num_workers or drop {key}{AUTOSCALE_HINT}"
            )


@contextmanager
def ray_train_env(cfg: JobConfig) -> Iterator[None]:
    """Set Ray Train's worker-group start timeout (``scaling.start_timeout_s``) and its
    controller's poll interval (``scaling.poll_interval_s``) for one run.

    Ray Train 2.x reads both only from the environment variables above, which the driver hands
    to its controller when ``fit()`` starts; the previous values are restored afterwards. A poll
    interval already set in the environment wins over the job's.
    """
    values = {START_TIMEOUT_ENV: f"{cfg.scaling.start_timeout_s:g}",
              POLL_INTERVAL_ENV: os.environ.get(POLL_INTERVAL_ENV) or f"{cfg.scaling.poll_interval_s:g}"}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def placement_error(err: BaseException, cfg: JobConfig) -> ClusterError | None:
    """A ``ClusterError`` stating the shortfall when ``err`` is Ray Train giving up on placing
    the worker group; None for any other failure."""
    cause = getattr(err, "controller_failure", None)
    name = type(cause).__name__
    if name == "InsufficientClusterResourcesError":
        return ClusterError(f"the cluster can never hold the workers: {' '.join(str(cause).split())}")
    if name != "WorkerGroupStartupTimeoutError":
        return None
    sc = cfg.scaling
    return ClusterError(
        f"{sc.num_workers} workers x ({_asked(cfg)}) were not placed within {sc.start_timeout_s:g} s "
        f"({sc.start_attempts} attempt(s)); free now: {free_of(cfg)}. Other jobs hold the rest, a node was lost, "
        "or nodes are still booting: free resources, lower scaling.num_workers, or raise scaling.start_timeout_s"
    )


def _asked(cfg: JobConfig) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in worker_resources(cfg).items())


def free_of(cfg: JobConfig) -> str:
    """Each resource a worker asks for (CPU and GPU always): free now of the cluster's total, alive nodes."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    keys = dict.fromkeys(["CPU", "GPU", *worker_resources(cfg)])
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g}" for k in keys) + f" on {alive} node(s)"


class PlacementWatch:
    """While Ray Train starts (or, after a lost worker, restarts) the worker group: when a placement group
    has waited ``notice_s`` for resources, one console line says what is asked, what is free and how long
    Ray Train waits; once per wait. Ray Train itself is silent until it gives up."""

    def __init__(self, cfg: JobConfig, notice_s: float | None = None, poll_s: float = 1.0) -> None:
        import threading

        sc = cfg.scaling
        self.cfg, self.poll_s = cfg, poll_s
        self.notice_s = notice_s if notice_s is not None else min(10.0, sc.start_timeout_s / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rayrec-placement-watch", daemon=True)
        self.said = 0

    def __enter__(self) -> PlacementWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import time

        from ray.util import placement_group_table

        known: set[str] = set()
        try:
            known = set(placement_group_table())  # other jobs' groups, there before this run
        except Exception:
            return
        waiting_since: float | None = None
        told = False
        while not self._stop.wait(self.poll_s):
            try:
                table = placement_group_table()
            except Exception:  # the cluster went away: nothing to watch
                return
            pending = [pg for pid, pg in table.items() if pid not in known
                       and pg.get("state") in ("PENDING", "RESCHEDULING")]
            if not pending:
                waiting_since, told = None, False
                continue
            waiting_since = waiting_since or time.monotonic()
            if not told and time.monotonic() - waiting_since >= self.notice_s:
                told = True
                self.said += 1
                sc = self.cfg.scaling
                log.warning("waiting for the cluster to place %d workers x (%s); free now: %s. Ray Train waits up "
                            "to %g s (scaling.start_timeout_s) per attempt", sc.num_workers, _asked(self.cfg),
                            free_of(self.cfg), sc.start_timeout_s)


#: Relative paths a job writes or reads as shared data: under ``$RAYREC_STORAGE_ROOT`` on a cluster.
SHARED_PATHS = ("data.path", "run.storage_path", "sids.dir", "model.features.dir", "model.features.cache_dir",
                "model.prefs.out_dir", "grpo.adapter", "grpo.collaborative_checkpoint")


def shared_paths(cfg):
    """``cfg`` with its relative data, run, SID-index, feature and GRPO-input paths under ``$RAYREC_STORAGE_ROOT``.

    On a cluster the job's working dir is a per-job temporary copy on the head node; every node
    must see the data and the checkpoints, and a re-submitted job must find its run (and its
    SID index, features and caches) again. The cluster sets the variable once (cluster/*.yaml);
    locally it is unset and nothing changes. Absolute paths are kept.
    """
    root = os.environ.get(STORAGE_ROOT_ENV)
    if not root:
        return cfg
    cfg = cfg.model_copy(deep=True)
    for _, section, name, value in _shared_fields(cfg):
        if isinstance(value, Path) and not value.is_absolute():
            setattr(section, name, Path(root).expanduser() / value)
    return cfg


def _shared_fields(cfg) -> Iterator[tuple[str, Any, str, Any]]:
    """(dotted key, its section, field name, value) of each ``SHARED_PATHS`` key ``cfg`` has."""
    for dotted in SHARED_PATHS:
        *parents, name = dotted.split(".")
        section = cfg
        for part in parents:
            section = getattr(section, part, None)
        if section is not None and hasattr(section, name):
            yield dotted, section, name, getattr(section, name)


def _shared_values(cfg) -> dict[str, Path]:
    """``SHARED_PATHS`` of ``cfg`` that are set: dotted key -> path."""
    return {dotted: Path(value).expanduser() for dotted, _, _, value in _shared_fields(cfg)
            if value and not is_object_uri(value)}  # an object store is the same for every node


def check_shared_storage(cfg, timeout_s: float = 120.0) -> None:
    """Every alive node of the cluster sees the job's run storage, data and index/feature folders as the
    same files the driver sees; a node that sees other files (a head-local path, another mount) fails
    the run here, naming the node and the path, before any worker starts.

    The driver writes a marker holding a fresh token into each folder (a file: its folder); a zero-CPU
    task pinned to each node reads them back; the markers are removed again. One node: nothing to do.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    token = uuid.uuid4().hex
    markers: dict[str, tuple[str, str]] = {}
    try:
        for key, path in _shared_values(cfg).items():
            folder = path if path.is_dir() else path.parent
            if not folder.is_dir():
                continue  # made later by the job (a feature cache): nothing to compare yet
            marker = folder / f".rayrec-shared-{token}"
            marker.write_text(token)
            markers[key] = (str(path), str(marker))

        @ray.remote(num_cpus=0, max_retries=0)
        def read(found: dict[str, tuple[str, str]]) -> dict[str, bool]:
            def same(p: str) -> bool:
                try:
                    return Path(p).read_text() == token
                except OSError:
                    return False
            return {key: same(marker) for key, (_, marker) in found.items()}

        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(markers) for n in nodes}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    finally:
        for _, marker in markers.values():
            Path(marker).unlink(missing_ok=True)
    bad = [(node, key) for node, ok in seen.items() for key, same in ok.items() if not same]
    if bad:
        node, key = bad[0]
        raise ClusterError(
            f"node {node} does not see the files of {key} = {markers[key][0]} that the driver sees (another disk, or "
            f"no mount there){f'; {len(bad) - 1} more node/path pairs alike' if len(bad) > 1 else ''}. Every node "
            f"must see the run storage and the data: put them on a file system all nodes mount (set "
            f"{STORAGE_ROOT_ENV}) or use object storage (s3://, gs://) for run.storage_path")
