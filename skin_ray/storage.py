"""Local paths and `s3://bucket/prefix` URIs behind one small API. All S3 access goes through here.

S3 uses the standard AWS credential chain (environment, shared config and credentials files, instance or
pod roles). An S3-compatible store such as MinIO is reached with the standard endpoint variables
`AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, which boto3 reads itself; the same endpoint is handed to
pyarrow for Ray Train's checkpoint storage and Ray Data's writers. Credentials are never logged.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an S3 URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@functools.lru_cache(maxsize=None)
def _s3_client_for(pid: int, endpoint: str | None, region_name: str | None):
    import boto3
    from botocore.config import Config

    # Cached per process (boto3 clients are not fork-safe) and per endpoint, so tests may switch endpoints.
    config = Config(retries={"max_attempts": 5, "mode": "adaptive"}, max_pool_connections=32)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region_name, config=config)


def s3_client():
    return _s3_client_for(os.getpid(), endpoint_url(), region())


def pyarrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for Ray Train storage and Ray Data writers."""
    if not is_s3(uri):
        return pyarrow.fs.LocalFileSystem(), str(Path(uri).absolute())
    bucket, key = split_s3(uri)
    endpoint = endpoint_url()
    kwargs = {"region": region() or "us-east-1"}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme or "https")
    return pyarrow.fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")


def exists(uri: str) -> bool:
    """Whether a file is at `uri` (local or S3)."""
    filesystem, path = pyarrow_filesystem(uri)
    return filesystem.get_file_info(path).type == pyarrow.fs.FileType.File


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Every file below `uri`, recursively, as full URIs (or absolute paths), sorted.

    `suffixes` filters by file extension, case-insensitively.
    """

    def wanted(name: str) -> bool:
        return suffixes is None or name.lower().endswith(suffixes)

    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        found = [
            f"s3://{bucket}/{item['Key']}"
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
            if not item["Key"].endswith("/") and wanted(item["Key"])
        ]
        return sorted(found)
    root = Path(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {uri}")
    return sorted(str(p.absolute()) for p in root.rglob("*") if p.is_file() and wanted(p.name))


def relative_to(path: str, root: str) -> str:
    """A path `list_files(root)` gave, relative to `root` as given (local roots are listed as absolute paths)."""
    base = root if is_s3(root) else str(Path(root).absolute())
    return path[len(base.rstrip("/")) :].strip("/")


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-folders of `uri`."""
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        return sorted(
            common["Prefix"][len(prefix) :].rstrip("/")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for common in page.get("CommonPrefixes", [])
        )
    root = Path(uri)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {uri}")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The file's bytes. With `max_bytes`, a larger file raises FileTooLargeError before it is read; a missing
    one raises FileNotFoundError, on S3 as on disk."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            if max_bytes is not None:
                _check_size(uri, s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"], max_bytes)
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            # A missing key is a missing file, as on disk: HEAD answers a bare 404, GET NoSuchKey.
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no such file: {uri}") from None
            raise
    if max_bytes is not None:
        _check_size(uri, os.path.getsize(uri), max_bytes)
    return Path(uri).read_bytes()


class FileTooLargeError(ValueError):
    pass


def _check_size(uri: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise FileTooLargeError(f"{uri} is {size:,} bytes, more than the {max_bytes:,} allowed")


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    Path(uri).write_bytes(data)


def download_files(uri: str, names: tuple[str, ...], local_dir: str) -> list[str]:
    """Copy those of the files `names` (paths relative to the S3 prefix `uri`) that exist into `local_dir`, at the
    same relative paths; return the names copied. Nothing else under the prefix is fetched, whatever keys a
    listing holds, and a name that would land outside `local_dir` is refused before anything is written."""
    root = Path(local_dir).resolve()
    for name in names:
        if not (root / name).resolve().is_relative_to(root) or Path(name).is_absolute():
            raise ValueError(f"refusing to copy {name!r}: it would land outside {local_dir}")
    bucket, prefix = split_s3(uri)
    prefix = prefix.rstrip("/") + "/"
    present = {split_s3(file_uri)[1][len(prefix) :] for file_uri in list_files(uri)}  # keys as stored, `..` and all
    copied = [name for name in names if name in present]
    for name in copied:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        s3_client().download_file(bucket, prefix + name, str(target))
    return copied


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy every file below `local_dir` to `uri` (S3) or into the directory `uri` (local; files only, so
    the target keeps its own permissions rather than the source's, a private temporary directory's)."""
    for path in sorted(Path(local_dir).rglob("*")):
        if not path.is_file():
            continue
        target = join(uri, str(path.relative_to(local_dir)))
        if is_s3(target):
            bucket, key = split_s3(target)
            s3_client().upload_file(str(path), bucket, key)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
