"""A real S3 API on 127.0.0.1 for tests: ``moto``'s server, started and stopped by the test that needs it.

Credentials are made up per server (moto accepts any) and reach rayrec only through the environment,
as on a real cluster; ``secret`` is what a test looks for in everything a run left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from local_ray import free_ports


class LocalS3:
    def __init__(self, folder: Path) -> None:
        (self.port,) = free_ports(1)
        self.folder, self.proc = Path(folder), None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.secret = f"rayrec-test-secret-{uuid.uuid4().hex}"
        self.env = {"AWS_ACCESS_KEY_ID": f"AKIARAYREC{uuid.uuid4().hex[:10].upper()}",
                    "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_ENDPOINT_URL": self.endpoint,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60.0) -> LocalS3:
        import requests

        log = open(self.folder / "moto.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.folder / "moto.log").read_text()[-2000:]
            try:
                if requests.get(f"{self.endpoint}/moto-api/", timeout=1).status_code < 500:
                    return self
            except requests.RequestException:
                time.sleep(0.2)
        raise TimeoutError(f"moto server did not start: {(self.folder / 'moto.log').read_text()[-2000:]}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.secret)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
