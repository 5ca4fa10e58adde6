"""Starting or joining Ray, and checking that a job fits the cluster before it starts."""

from __future__ import annotations

import logging
import os

from rayrec.config.schema import JobConfig
from rayrec.errors import RayrecError

log = logging.getLogger(__name__)

#: CPUs left free for Ray Data's read/map tasks; without them a run hangs silently.
DATA_CPU_RESERVE = 1.0


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
        ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=True,
                 logging_level=logging.WARNING)


def preflight(cfg: JobConfig) -> None:
    """Fail in seconds, stating the shortfall, when the job can never be placed."""
    import ray

    total = ray.cluster_resources()
    sc = cfg.scaling
    cpu_each = float(sc.resources_per_worker.get("CPU", 0.0 if sc.use_gpu else 1.0))
    need_cpu = cpu_each * sc.num_workers
    have_cpu = float(total.get("CPU", 0.0))
    if sc.use_gpu:
        gpus = float(total.get("GPU", 0.0))
        need_gpu = sc.num_workers * float(sc.resources_per_worker.get("GPU", 1.0))
        if gpus < need_gpu:
            raise RayrecError(f"scaling.use_gpu=true needs {need_gpu:g} GPUs for {sc.num_workers} workers, "
                              f"the cluster has {gpus:g}; set scaling.use_gpu=false or add GPU nodes")
    if need_cpu > have_cpu - DATA_CPU_RESERVE:
        raise RayrecError(
            f"scaling asks for {sc.num_workers} workers x {cpu_each:g} CPU = {need_cpu:g} CPUs, but the cluster "
            f"has {have_cpu:g} and Ray Data needs {DATA_CPU_RESERVE:g} free; lower scaling.num_workers or set "
            f"scaling.resources_per_worker.CPU={max(0.25, (have_cpu - DATA_CPU_RESERVE) / sc.num_workers):g}"
        )
