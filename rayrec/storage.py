"""Run storage on object stores (``s3://bucket/prefix``, ``gs://bucket/prefix``), through pyarrow's file systems.

``run.storage_path`` is a local folder or an object-store URI. On an object store Ray Train writes the
checkpoints itself (``RunConfig.storage_path`` takes the URI; every process resolves the file system
from its own environment), and the driver keeps here what it reads and writes beside them: the
completion marker, the pointer to the finished run's checkpoint, the newest checkpoint to resume from.

Credentials and the endpoint come only from the environment each process already has
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``; ``GOOGLE_APPLICATION_CREDENTIALS`` for GCS) or the machine's role: a URI
holding credentials is refused, and no file system object (which would carry the keys) is ever
pickled into Ray's tasks, configs or checkpoints.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rayrec.errors import RayrecError
from rayrec.secrets import secret_name

#: URI schemes of the object stores pyarrow reaches (``gs`` and ``gcs`` are the same store).
OBJECT_SCHEMES = ("s3", "gs", "gcs")


def is_object_uri(value: object) -> bool:
    """``value`` names a folder on an object store (``s3://``, ``gs://``)."""
    return isinstance(value, str) and urlsplit(value).scheme in OBJECT_SCHEMES and "://" in value


def storage_value(value: object, key: str = "run.storage_path") -> object:
    """A config's storage value: an object-store URI stays a string (a ``Path`` would fold its ``//``),
    anything else is a local path. A URI with credentials, or of a scheme no store has, is refused."""
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in OBJECT_SCHEMES:
            raise ValueError(f"{key}: {parts.scheme}:// is not a storage rayrec writes to; use a local or shared "
                             f"folder, or object storage ({', '.join(s + '://' for s in OBJECT_SCHEMES)})")
        if "@" in parts.netloc or any(secret_name(k) for k in parse_qs(parts.query)):
            raise ValueError(f"{key}: credentials do not go in the storage URI (they would reach logs, MLflow and "
                             "configs); set them in the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
                             "(AWS_ENDPOINT_URL for another S3 API), or GOOGLE_APPLICATION_CREDENTIALS")
        if not parts.netloc:
            raise ValueError(f"{key}: {value!r} names no bucket; write {parts.scheme}://BUCKET/PREFIX")
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return Path(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class ObjectFolder:
    """One folder (a key prefix) of an object store: ``uri`` as the user wrote it, ``path`` as pyarrow names it."""

    uri: str
    path: str

    @classmethod
    def at(cls, uri: str) -> ObjectFolder:
        """The folder ``uri`` names (nothing is checked; ``open_folder`` checks it is writable)."""
        parts = urlsplit(uri)
        return cls(uri.rstrip("/"), f"{parts.netloc}{parts.path}".rstrip("/"))

    @property
    def fs(self):
        """The store's file system, resolved from this process's environment (cached per process)."""
        return _filesystem(self.uri)

    def child(self, name: str) -> ObjectFolder:
        return ObjectFolder(f"{self.uri}/{name}", f"{self.path}/{name}")

    def exists(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(f"{self.path}/{rel}").type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str | None:
        """The object's text, or None where there is none."""
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.path}/{rel}") as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """One PUT: the object appears whole or not at all (an object store has no half-written object)."""
        with self.fs.open_output_stream(f"{self.path}/{rel}") as f:
            f.write(text.encode())

    def folders(self) -> list[str]:
        """Names of the folders directly under this one."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [os.path.basename(i.path) for i in infos if i.type == pafs.FileType.Directory]

    def download(self, dest: Path) -> Path:
        """Copy this folder's objects into the local folder ``dest`` (made whole: written beside it, then
        renamed into place)."""
        import shutil

        from pyarrow import fs as pafs

        dest = Path(dest)
        if dest.is_dir():
            return dest
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True)
        try:
            pafs.copy_files(self.path, str(tmp), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if dest.is_dir():  # another process got there first
                return dest
            raise
        return dest


def _filesystem(uri: str):
    from pyarrow import fs as pafs

    key = urlsplit(uri)
    cached = _FILESYSTEMS.get((key.scheme, key.netloc))
    if cached is None:
        cached, _ = pafs.FileSystem.from_uri(f"{key.scheme}://{key.netloc}")
        _FILESYSTEMS[(key.scheme, key.netloc)] = cached
    return cached


_FILESYSTEMS: dict[tuple[str, str], object] = {}


def open_folder(uri: str, key: str = "run.storage_path") -> ObjectFolder:
    """The object-store folder ``uri``, after a write and a delete there prove it is reachable and
    writable; a failure is a ``RayrecError`` naming ``key``, the URI and the store's answer."""
    folder = ObjectFolder.at(uri)
    probe = f".rayrec-probe-{uuid.uuid4().hex}"
    try:
        folder.write_text(probe, "")
        folder.fs.delete_file(f"{folder.path}/{probe}")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RayrecError(f"{key} {uri} cannot be written: {first[:300]}. Check the bucket exists and the "
                          "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                          "AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS) may write it") from None
    return folder


def path_or_uri(value: str) -> Path | str:
    """A command-line folder argument that may be an object-store URI (``Path`` would fold its ``//``)."""
    return value if is_object_uri(value) else Path(value)


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray ``Checkpoint`` lives: its local path, or ``scheme://bucket/key`` on an object store."""
    fs = getattr(checkpoint, "filesystem", None)
    kind = getattr(fs, "type_name", "local")
    if kind in ("local", None):
        return str(checkpoint.path)
    return f"{'gs' if kind == 'gcs' else kind}://{checkpoint.path}"


def local_home(uri: str) -> Path:
    """This machine's folder of an object-store run or checkpoint (a run's lock and console log, a
    checkpoint's local copy): ``$RAYREC_HOME/object_runs/SCHEME/BUCKET/KEY`` (``RAYREC_HOME``: ``~/.rayrec``)."""
    parts = urlsplit(uri)
    return _homes() / parts.scheme / parts.netloc / parts.path.strip("/")


def home_uri(folder: Path) -> str | None:
    """The object-store URI whose ``local_home`` ``folder`` is, else None."""
    try:
        scheme, *rest = Path(folder).resolve().relative_to(_homes().resolve()).parts
    except ValueError:
        return None
    return f"{scheme}://{'/'.join(rest)}" if scheme in OBJECT_SCHEMES and rest else None


def _homes() -> Path:
    return Path(os.environ.get("RAYREC_HOME", "~/.rayrec")).expanduser() / "object_runs"
