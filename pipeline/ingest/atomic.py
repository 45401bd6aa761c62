"""Atomic publication of files to any fsspec URL: a reader sees the whole object or nothing.

Local filesystems: the bytes go to a hidden temporary name in the destination folder, are fsynced, then
`os.replace`d onto the final name (rename is atomic within one filesystem). S3 and GCS: the bytes are streamed (a
multipart or resumable upload, block by block); the store exposes the object only once its upload completes at
close, so a failed write (its upload aborted) or a killed one leaves nothing at the final name. A killed process
leaves its parts uploaded but invisible (and billed): a bucket lifecycle rule (S3: AbortIncompleteMultipartUpload)
deletes them. Other stores: spooled to local disk, uploaded as one object at the end. Temporary local names start
with "." and contain ".tmp-", so shard globs (`shard-*.tar`) never match them; `remove_stale_temporaries` sweeps
them on the next run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

TMP_MARK = ".tmp-"
log = logging.getLogger(__name__)


def url_to_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextmanager
def atomic_writer(url: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit its content appears at `url` in one step, on error nothing appears."""
    fs, path = url_to_fs(url, storage_options)
    if set(_STREAMED) & set(_protocols(fs)):
        yield from _streamed(fs, path)
        return
    if is_local(fs):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP_MARK}", dir=folder)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f"ingest{TMP_MARK}")  # spooled, uploaded whole at the end
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# Stores whose writes stream (block by block, one in memory, nothing on local disk: a 10,000-URL unit's stage tar is
# ~1 GB, and a node runs 64) and expose the object only when the upload completes at close, with a discard() that
# aborts it. Others (Azure's adlfs has no discard; memory://, sftp and hdfs show a partial file) are spooled.
_STREAMED = ("s3", "s3a", "gs", "gcs")


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _streamed(fs, path: str) -> Iterator[BinaryIO]:
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        try:
            f.discard()  # aborts the multipart upload begun, if any
        except Exception as e:  # noqa: BLE001 - the write's own error is the one to raise
            log.warning("could not abort the upload of %s (%s): its parts stay, invisible, until the bucket's "
                        "lifecycle rule removes them", path, e)
        finally:
            f.closed = True  # garbage collection must not complete the upload
        raise
    f.close()


def put_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    with atomic_writer(url, storage_options) as f:
        f.write(data)


def put_bytes_if_absent(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Publish `data` at `url` unless an object is already there: True if this call published it, False if one was
    there (left as it is). Exclusive on local filesystems (link(2) of a whole temporary onto the name) and on S3
    (PutObject with If-None-Match: *; AWS since 2024, MinIO, moto). Elsewhere, and on an S3-compatible store that
    ignores the condition, an existence check before the write: of two writers racing, the later can still win."""
    fs, path = url_to_fs(url, storage_options)
    if is_local(fs):
        return _link_if_absent(path, data)
    fs.invalidate_cache(path)  # s3fs answers exists() from a listing it cached, which may predate the object
    if fs.exists(path):  # where the create is not exclusive, this narrows the race to one request's time
        return False
    if {"s3", "s3a"} & set(_protocols(fs)) and not _NO_CONDITIONAL_PUT:
        try:
            fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:  # s3fs's name for 412 PreconditionFailed on If-None-Match
            return False
        except OSError as e:
            code, status = _s3_error(e)
            if code == "PreconditionFailed" or status == 412:  # a store whose 412 names no Condition (s3fs: EINVAL)
                return False
            if code not in ("NotImplemented", "InvalidArgument", "InvalidRequest") and status != 501:
                raise
            # An S3-compatible store without conditional writes (older Ceph, some appliances): the existence check
            # above is all there is; said once per process.
            _NO_CONDITIONAL_PUT.append(code or str(status))
            log.warning("%s refuses If-None-Match writes (%s): stage tables are checked, then written; two "
                        "attempts of a unit racing to the same table can leave the later one's", url, code or status)
    put_bytes(url, data, storage_options)
    return True


_NO_CONDITIONAL_PUT: list[str] = []  # set once a store refuses If-None-Match


def _s3_error(error: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status behind an s3fs OSError (its __cause__ is botocore's ClientError)."""
    cause: BaseException | None = error
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return (response.get("Error", {}).get("Code"),
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        cause = cause.__cause__
    return None, None


def _link_if_absent(path: str, data: bytes) -> bool:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{TMP_MARK}", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the name exists: the exclusive create that rename(2) lacks
        except FileExistsError:
            return False
        except OSError as e:  # a filesystem without hard links (some FUSE and SMB mounts): check, then rename
            log.debug("no link(2) in %s (%s): existence check before the rename", folder, e)
            if os.path.exists(path):
                return False
            os.replace(tmp, path)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def put_table(url: str, table, storage_options: dict | None = None, row_group_size: int | None = None) -> None:
    """A pyarrow Table as one parquet file at `url`, atomically."""
    import pyarrow.parquet as pq

    with atomic_writer(url, storage_options) as f:
        pq.write_table(table, f, row_group_size=row_group_size)


def remove_stale_temporaries(url: str, storage_options: dict | None = None) -> int:
    """Delete temporaries left by a killed run under a local folder; object stores have none. Returns the count."""
    fs, path = url_to_fs(url, storage_options)
    if not is_local(fs) or not os.path.isdir(path):
        return 0
    removed = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            if name.startswith(".") and TMP_MARK in name:
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed
