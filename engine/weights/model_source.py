"""Where a checkpoint's files come from: a local directory, the Hugging Face Hub, or an object store.

A source fetches in two steps: :meth:`ModelSource.fetch_metadata` brings the small files (config, generation
config, tokenizer, safetensors index), enough to check the model and tokenize; :meth:`ModelSource.fetch_weights`
brings the safetensors files into the same directory. Remote files are fetched once per node: the processes of a
node (Serve replicas, tensor-parallel workers) take a file lock, one downloads and the others wait, then find the
files in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from engine.weights.safetensors_loader import SAFETENSORS_INDEX, checkpoint_file_names, read_index

logger = logging.getLogger(__name__)

# The files of a model repository the engine reads besides the weights.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    SAFETENSORS_INDEX,
)
# "org/name" with an optional "@revision" (branch, tag or commit).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


class ModelSourceError(ValueError):
    """The model a config names cannot be used; the message names the model and the cause."""


def cache_dir() -> Path:
    """Where converted and copied models are cached: ``$VATTN_CACHE_DIR`` or ``~/.cache/vattention``."""
    return Path(os.environ.get("VATTN_CACHE_DIR") or Path.home() / ".cache" / "vattention")


def is_hub_id(model: str) -> bool:
    """Whether ``model`` reads as a Hugging Face Hub id, ``org/name`` or ``org/name@revision``."""
    return bool(_HUB_ID.match(model))


@contextlib.contextmanager
def node_lock(key: str, what: str) -> Iterator[None]:
    """Hold the node-wide lock ``key`` (a file under :func:`cache_dir`), logging when another process has it."""
    from filelock import FileLock, Timeout

    path = cache_dir() / "locks" / (re.sub(r"[^\w.-]", "_", key) + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process of this node is fetching %s; waiting for it", what)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class ModelSource(ABC):
    """One place a checkpoint lives. ``name`` is the model string as the user wrote it."""

    name: str

    @abstractmethod
    def fetch_metadata(self) -> Path:
        """The local directory holding ``config.json``, the tokenizer files and the safetensors index, if any.

        Raises:
            ModelSourceError: not found, not allowed, or no safetensors weights.
        """

    @abstractmethod
    def fetch_weights(self) -> Path:
        """The same directory, with the checkpoint's safetensors files in it."""

    def _error(self, cause: str) -> ModelSourceError:
        return ModelSourceError(f"model {self.name!r}: {cause}")

    def _check_weight_names(self, names: list[str], where: str) -> list[str]:
        if not names:
            raise self._error(
                f"no *.safetensors weights {where} (other formats, such as PyTorch .bin files, are not read)"
            )
        return names


class LocalSource(ModelSource):
    """A directory with ``config.json`` and ``*.safetensors`` (a Hugging Face checkpoint saved as is)."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or str(path)

    def fetch_metadata(self) -> Path:
        if not (self.path / "config.json").is_file():
            raise self._error(f"directory {self.path} has no config.json")
        names = checkpoint_file_names(read_index(self.path), (p.name for p in self.path.iterdir()))
        self._check_weight_names(names, f"in {self.path}")
        return self.path

    def fetch_weights(self) -> Path:
        return self.fetch_metadata()


class HubSource(ModelSource):
    """A Hugging Face Hub repository, ``org/name[@revision]``, through ``huggingface_hub``: its standard cache
    (``HF_HUB_CACHE`` / ``HF_HOME``), ``HF_TOKEN`` for gated and private repositories, ``HF_HUB_OFFLINE=1`` to use
    the cache only. Only the files the engine reads are downloaded."""

    def __init__(self, model: str) -> None:
        self.name = model
        repo_id, _, revision = model.partition("@")
        self.repo_id = repo_id
        self.revision = revision or None
        self._snapshot: Path | None = None
        self._weight_names: list[str] = []

    @staticmethod
    def is_offline() -> bool:
        """``HF_HUB_OFFLINE`` as set now (``huggingface_hub`` reads it once, at import)."""
        from huggingface_hub import constants

        flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
        return flag or constants.HF_HUB_OFFLINE

    @contextlib.contextmanager
    def _hub_errors(self) -> Iterator[None]:
        """Turn ``huggingface_hub``'s exceptions into a :class:`ModelSourceError` naming the cause."""
        from huggingface_hub import errors, get_token

        repo = f"Hugging Face Hub repository {self.repo_id!r}"
        try:
            yield
        except errors.GatedRepoError as exc:
            if get_token():
                raise self._error(f"{repo} is gated and HF_TOKEN's account has not been granted access") from exc
            raise self._error(
                f"{repo} is gated: accept its license on the Hub, then set HF_TOKEN to a token of that account"
            ) from exc
        except errors.RepositoryNotFoundError as exc:
            hint = "" if get_token() else " (a private repository needs HF_TOKEN)"
            raise self._error(f"{repo} not found{hint}") from exc
        except errors.RevisionNotFoundError as exc:
            raise self._error(f"revision {self.revision!r} not found in {repo}") from exc
        except errors.LocalEntryNotFoundError as exc:
            why = "HF_HUB_OFFLINE is set" if self.is_offline() else "the Hub could not be reached"
            raise self._error(
                f"{repo} is not in the local Hugging Face cache, or only in part, and {why}: {exc}"
            ) from exc
        except errors.HFValidationError as exc:
            raise self._error(f"not a valid Hugging Face Hub id: {exc}") from exc
        except errors.HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (401, 403):
                raise self._error(f"{repo}: not authorized (HTTP {status}); check HF_TOKEN") from exc
            raise self._error(f"{repo}: download failed: {exc}") from exc

    def _download(self, allow_patterns: list[str], revision: str | None) -> Path:
        from huggingface_hub import snapshot_download

        with self._hub_errors():
            path = snapshot_download(
                self.repo_id,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=self.is_offline(),
            )
        return Path(path)

    def fetch_metadata(self) -> Path:
        if self._snapshot is not None:
            return self._snapshot
        snapshot = self._download(list(METADATA_FILES), self.revision)
        if not (snapshot / "config.json").is_file():
            raise self._error(f"Hugging Face Hub repository {self.repo_id!r} has no config.json")
        index = read_index(snapshot)
        if index is not None or self.is_offline():
            listing = [p.name for p in snapshot.iterdir()]
            where = "in its index" if index is not None else f"in the cached snapshot {snapshot} (HF_HUB_OFFLINE)"
        else:
            from huggingface_hub import HfApi

            with self._hub_errors():
                listing = HfApi().list_repo_files(self.repo_id, revision=snapshot.name)
            where = f"in Hugging Face Hub repository {self.repo_id!r}"
        self._weight_names = self._check_weight_names(checkpoint_file_names(index, listing), where)
        self._snapshot = snapshot
        return snapshot

    def fetch_weights(self) -> Path:
        snapshot = self.fetch_metadata()
        # The snapshot directory is named by the commit: the weights come from the same commit as the config.
        with node_lock(f"hub-{self.repo_id}-{snapshot.name}", f"the weights of {self.repo_id}"):
            self._download(self._weight_names, snapshot.name)
        return snapshot


class ObjectStoreSource(ModelSource):
    """A checkpoint directory in an object store, ``s3://bucket/prefix`` or ``gs://bucket/prefix`` (any ``fsspec``
    URL: ``s3fs`` and ``gcsfs`` are the optional extras ``s3`` and ``gcs``), copied once into
    ``<cache_dir>/remote/<protocol>/<bucket>/<prefix>`` and reused; a file whose size changed is copied again.
    Credentials are the filesystem's own (``AWS_*`` variables or profiles, ``GOOGLE_APPLICATION_CREDENTIALS``)."""

    def __init__(self, url: str, show_progress: bool = True) -> None:
        self.name = url
        self.url = url.rstrip("/")
        self.show_progress = show_progress
        self.protocol = url.split("://", 1)[0]
        self.local_dir = cache_dir() / "remote" / self.protocol / self.url.split("://", 1)[1].strip("/")
        self._listing: dict[str, int] | None = None
        self._weight_names: list[str] = []

    def _filesystem(self):
        import fsspec

        try:
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(self.protocol)
            hint = f" (pip install 'vattention-serve[{extra}]')" if extra else ""
            raise self._error(f"{exc}{hint}") from exc
        except ValueError as exc:
            raise self._error(f"unsupported URL: {exc}") from exc

    def _list(self, fs, path: str) -> dict[str, int]:
        """``{file name: size}`` of the files directly under the prefix."""
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError as exc:
            raise self._error("not found") from exc
        except PermissionError as exc:
            raise self._error(f"access denied ({exc}); check the object store's credentials") from exc
        return {PurePosixPath(e["name"]).name: int(e["size"]) for e in entries if e.get("type") == "file"}

    def _copy(self, fs, path: str, names: list[str], listing: dict[str, int], what: str) -> None:
        """Copy ``names`` not already here at their listed size; a partial copy never takes a final name."""
        from fsspec.callbacks import TqdmCallback

        with node_lock(f"remote-{self.url}-{what}", f"the {what} of {self.url}"):
            self.local_dir.mkdir(parents=True, exist_ok=True)
            for name in names:
                dst = self.local_dir / name
                if dst.is_file() and dst.stat().st_size == listing[name]:
                    continue
                partial = dst.with_name(dst.name + ".partial")
                callback = TqdmCallback(
                    tqdm_kwargs={"desc": name, "unit": "B", "unit_scale": True, "disable": not self.show_progress}
                )
                fs.get_file(f"{path}/{name}", str(partial), callback=callback)
                os.replace(partial, dst)

    def fetch_metadata(self) -> Path:
        fs, path = self._filesystem()
        listing = self._list(fs, path)
        if "config.json" not in listing:
            raise self._error("no config.json under this prefix")
        self._copy(fs, path, [n for n in METADATA_FILES if n in listing], listing, "metadata")
        index = read_index(self.local_dir)
        where = "in its index" if index is not None else "under this prefix"
        self._weight_names = self._check_weight_names(checkpoint_file_names(index, listing), where)
        missing = [n for n in self._weight_names if n not in listing]
        if missing:
            raise self._error(f"{SAFETENSORS_INDEX} names files missing from the store: {missing[:5]}")
        self._listing = listing
        return self.local_dir

    def fetch_weights(self) -> Path:
        if self._listing is None:
            self.fetch_metadata()
        fs, path = self._filesystem()
        self._copy(fs, path, self._weight_names, self._listing, "weights")
        return self.local_dir
