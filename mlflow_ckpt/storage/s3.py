"""S3 through our own boto3 client: uploads from memory, listings, downloads, deletes.

MLflow's S3 repository uploads local files with boto3's managed transfer. Our files already
sit in memory and every byte is covered by the manifest's hash, so we write them with the
plain S3 API instead: a file up to ``TransferConfig.part_bytes`` is one ``PutObject``, a
larger one a multipart upload whose parts go up several at a time while the next part is
encoded. An unfinished multipart upload is aborted, so nothing is visible at the key before
``CompleteMultipartUpload``.

The client is built from MLflow's documented S3 settings (see
:mod:`mlflow_ckpt.storage.clients`) rather than taken from MLflow's repository: that one
is private to it and retries every call up to 5 times under our own retries.
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlflow_ckpt.storage import clients
from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink
from mlflow_ckpt.storage.transfer import TransferConfig

logger = logging.getLogger(__name__)

# Arguments every request of one multipart upload must repeat (the others go on its start).
_PER_PART_ARGS = (
    "ExpectedBucketOwner",
    "SSECustomerAlgorithm",
    "SSECustomerKey",
    "SSECustomerKeyMD5",
    "RequestPayer",
)
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


class S3Store(RepositoryStore):
    """``s3://bucket/path`` through a boto3 client that tries each call once."""

    # Glacier Instant Retrieval: cheap storage, still read at once (no restore step)
    cold_class: str | None = "GLACIER_IR"
    hot_class: str | None = "STANDARD"

    def __init__(self, uri: str, config: TransferConfig | None = None) -> None:
        super().__init__(uri, config)
        parts = urlsplit(uri)
        self._bucket = parts.netloc
        self._prefix = parts.path.strip("/")
        self._owner = clients.s3_bucket_owner()
        self._client = clients.Lazy(clients.s3_client)

    @property
    def client(self) -> Any:
        """The boto3 client (made on first use)."""
        return self._client.get()

    def _listing(self, directory: str) -> tuple[dict[str, int], list[str]]:
        folder = self._key(directory).rstrip("/")
        start = f"{folder}/" if folder else ""
        files: dict[str, int] = {}
        folders: list[str] = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=start, Delimiter="/", **self._owner
        )
        for page in pages:
            for item in page.get("Contents", []):
                name = item["Key"][len(start) :]
                if name:  # not the folder's own marker object
                    files[name] = int(item["Size"])
            folders += [
                p["Prefix"][len(start) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
        return files, folders

    def _download(self, rel_path: str, target: Path) -> Path:
        from boto3.s3.transfer import TransferConfig as BotoTransfer

        local = target / posixpath.basename(rel_path)
        # Ranged GETs in parallel for large files, as MLflow downloads them; one attempt at
        # re-reading a cut stream (the transfer manager's own retry), ours retry the file.
        self.client.download_file(
            self._bucket,
            self._key(rel_path),
            str(local),
            ExtraArgs=dict(self._owner),
            Config=BotoTransfer(num_download_attempts=1, max_concurrency=self.config.max_workers),
        )
        return local

    def _remove(self, rel_path: str) -> None:
        self.client.delete_object(Bucket=self._bucket, Key=self._key(rel_path), **self._owner)

    def _remove_all(self) -> None:
        folder = self._key("").rstrip("/")
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=f"{folder}/" if folder else "", **self._owner
        )
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            reply = self.client.delete_objects(
                Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}, **self._owner
            )
            if reply.get("Errors"):
                first = reply["Errors"][0]
                raise OSError(
                    f"S3 kept {len(reply['Errors'])} object(s), e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        client, key = self.client, self._key(rel_path)
        source = {"Bucket": self._bucket, "Key": key}
        extra = {"StorageClass": storage_class, **self._owner}
        # A copy onto itself: boto3's managed copy (multipart beyond 8 MiB, so past S3's
        # 5 GB single-copy limit too) keeps the metadata and sets the new class.
        self._run(
            lambda: client.copy(source, self._bucket, key, ExtraArgs=extra, SourceClient=client),
            f"move {rel_path} to {storage_class} in",
        )

    def storage_class(self, rel_path: str) -> str:
        client, key = self.client, self._key(rel_path)
        head = self._run(
            lambda: client.head_object(Bucket=self._bucket, Key=key, **self._owner), "read"
        )
        return str(head.get("StorageClass") or "STANDARD")  # S3 omits it for STANDARD

    def _sink(self, directory: str, name: str) -> PartSink | None:
        extra: dict[str, Any] = {**self._owner, **clients.s3_upload_extra_args()}
        content_type, encoding = mimetypes.guess_type(name)
        if content_type:
            extra.setdefault("ContentType", content_type)
        if encoding:
            extra.setdefault("ContentEncoding", encoding)
        key = self._key(posixpath.join(directory, name))
        return _S3Object(self.client, self._bucket, key, extra)


class _S3Object:
    """One S3 object written from memory (see :class:`~.streaming.PartSink`)."""

    parallel = True
    retryable_parts = True

    def __init__(self, client: Any, bucket: str, key: str, extra: dict[str, Any]) -> None:
        self._client = client
        self._where = {"Bucket": bucket, "Key": key}
        self._extra = extra
        self._per_part = {k: v for k, v in extra.items() if k in _PER_PART_ARGS}
        self._upload_id: str | None = None

    def put(self, data: bytes | bytearray) -> None:
        self._client.put_object(Body=data, **self._where, **self._extra)

    def begin(self) -> None:
        reply = self._client.create_multipart_upload(**self._where, **self._extra)
        self._upload_id = reply["UploadId"]

    def put_part(
        self, number: int, offset: int, data: bytes | bytearray, final: bool
    ) -> dict[str, Any]:
        reply = self._client.upload_part(
            Body=data, PartNumber=number, UploadId=self._upload_id, **self._where, **self._per_part
        )
        return {"ETag": reply["ETag"], "PartNumber": number}

    def complete(self, tokens: list[Any], total: int) -> None:
        self._client.complete_multipart_upload(
            UploadId=self._upload_id,
            MultipartUpload={"Parts": tokens},
            **self._where,
            **{k: v for k, v in self._per_part.items() if not k.startswith("SSECustomer")},
        )

    def abort(self) -> None:
        if self._upload_id is not None:
            self._client.abort_multipart_upload(UploadId=self._upload_id, **self._where)
