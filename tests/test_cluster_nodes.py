"""Several Ray nodes on this host (issue 28): every node must see the run's storage and data.

The nodes are `ray start --address` processes (``local_ray.WorkerNode``) with their own temp dirs and
ports; a node started in its own mount namespace with a tmpfs over the runs folder sees other files
there than the driver, as a head-local disk looks from another machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, ray
from rayrec.cluster import check_shared_storage
from rayrec.config.kinds import load_job_file
ray.init(address=sys.argv[1], logging_level="ERROR")
check_shared_storage(load_job_file(sys.argv[2], sys.argv[3:]))
print("every node sees the same files")
"""


@pytest.mark.slow
def test_a_node_that_sees_other_files_fails_the_preflight_naming_it(tiny_dataset, tmp_path):
    from local_ray import BIN, LocalHead, WorkerNode, raise_interrupt_on_sigterm

    raise_interrupt_on_sigterm()
    runs = tmp_path / "runs"
    runs.mkdir()
    overrides = [f"data.path={tiny_dataset}", "data.prepare_if_missing=false", f"run.storage_path={runs}",
                 "run.name=blind", "tracking.enabled=false", "train.epochs=1", "model.hidden=16", "model.max_len=20",
                 "train.eval.ks=[5,10]", "scaling.num_workers=2", "scaling.resources_per_worker={CPU: 0.5}"]
    job = ROOT / "jobs" / "quickstart.yaml"
    head = LocalHead(num_cpus=2).start()
    nodes = []
    try:
        nodes.append(WorkerNode(head, 1, {"node_b": 1}, private_tmpfs=runs).start())
        env = head.env(RAY_ADDRESS=head.gcs_address)
        done = subprocess.run([str(BIN / "rayrec"), "train", str(job), *overrides], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-3000:]
        said = done.stderr.strip().splitlines()[-1]
        assert re.search(rf"node \S+ [0-9a-f]{{8}} does not see the files of run.storage_path = {runs} ", said), said
        assert not list(runs.rglob(".rayrec-shared-*"))  # the markers are removed
        nodes.pop().stop()
        nodes.append(WorkerNode(head, 1, {"node_c": 1}).start())  # a node of the same disk
        ok = subprocess.run([sys.executable, "-c", CHECK, head.gcs_address, str(job), *overrides], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ok.returncode == 0 and "every node sees the same files" in ok.stdout, ok.stderr[-3000:]
    finally:
        for node in nodes:
            node.stop()
        head.stop()
