"""The S3-compatible mirror target (AWS, MinIO, Ceph, R2, ...), through boto3.

Why boto3: it is the reference client whose credential chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``~/.aws/config``, instance roles) and endpoint override (``AWS_ENDPOINT_URL``) every
S3-compatible store documents; its transfer manager uploads large files in parts with bounded memory
(``multipart_chunksize x max_concurrency``) and aborts a failed multipart upload. s3fs would add fsspec's async
layer and aiobotocore's tight botocore pins for nothing we need; obstore is fast but its credentials and errors
differ from what users of these stores know. boto3 is imported only when an ``s3://`` mirror is used.

Visibility: a PUT or a multipart upload becomes visible only when complete; the mirror writes the manifest
after it has read the object back and verified it, so a copy cut short is never listed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .mirror_target import MirrorError, MirrorTarget

__all__ = ["S3Target"]

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "AccessDenied",
                     "ExpiredToken", "InvalidToken", "UnrecognizedClientException", "403"}
_PART_SIZE = 64 * 2**20
_CONCURRENCY = 4


class S3Target(MirrorTarget):
    """``s3://bucket/prefix``: each checkpoint file is the object ``prefix/<file name>``."""

    def __init__(self, url: str, *, part_size: int = _PART_SIZE, concurrency: int = _CONCURRENCY) -> None:
        rest = url.removeprefix("s3://")
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"mirror {url!r}: name a bucket, e.g. s3://my-bucket/run1")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ModuleNotFoundError:
            raise ValueError(f"mirror {url}: s3:// needs boto3; install it with `pip install ckptio[s3]`") from None
        # Few, quick retries inside boto3: the mirror retries whole copies with its own backoff.
        self.client = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5,
                                read_timeout=60))
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency, use_threads=concurrency > 1)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, source: Path) -> None:
        with _translated(self, key):
            self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)

    def get_file(self, key: str, destination: Path) -> None:
        with _translated(self, key):
            self.client.download_file(self.bucket, self._key(key), str(destination), Config=self.transfer)

    def put_bytes(self, key: str, data: bytes) -> None:
        with _translated(self, key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with _translated(self, key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def list_keys(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        keys = []
        with _translated(self, ""):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start,
                                                                              Delimiter="/"):
                keys += [item["Key"][len(start):] for item in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        with _translated(self, key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)


class _translated:
    """Turn botocore's exceptions into errors that say what to change (never a traceback for the user)."""

    def __init__(self, target: S3Target, key: str) -> None:
        self.target, self.key = target, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc is None:
            return False
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"{self.target.url}/{self.key}" if self.key else self.target.url
        if isinstance(exc, NoCredentialsError):
            raise MirrorError(f"{where}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                              "(or AWS_PROFILE)") from None
        code = ""
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
        elif isinstance(exc, S3UploadFailedError):
            code = next((c for c in _CREDENTIAL_CODES | {"NoSuchBucket"} if c in str(exc)), "")
        if code in _CREDENTIAL_CODES:
            raise MirrorError(f"{where}: the store refused the credentials ({code}); check AWS_ACCESS_KEY_ID, "
                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions") from None
        if code == "NoSuchBucket":
            raise MirrorError(f"{where}: the bucket {self.target.bucket!r} does not exist at "
                              f"{self.target.endpoint()}; create it or fix the URL") from None
        if code in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"{where}: no such object") from None
        if isinstance(exc, BotoCoreError | ClientError | S3UploadFailedError):
            raise MirrorError(f"{where}: {exc} (endpoint {self.target.endpoint()}; AWS_ENDPOINT_URL sets another)"
                              ) from None
        return False
