"""S3 uploads from memory: one ``PutObject`` per small file, multipart parts for larger ones.

MLflow's S3 repository uploads local files with boto3's managed transfer. Our files already
sit in memory and every byte is covered by the manifest's hash, so we write them with the
plain S3 API instead: a file up to ``TransferConfig.part_bytes`` is one ``PutObject``, a
larger one a multipart upload whose parts go up several at a time while the next part is
encoded. An unfinished multipart upload is aborted, so nothing is visible at the key before
``CompleteMultipartUpload``. The client, credentials, endpoint and extra upload arguments
(``MLFLOW_S3_UPLOAD_EXTRA_ARGS``, bucket owner) are MLflow's own.
"""

from __future__ import annotations

import logging
import mimetypes
import posixpath
from typing import Any

from mlflow_ckpt.storage.repository import RepositoryStore
from mlflow_ckpt.storage.streaming import PartSink

logger = logging.getLogger(__name__)

# Arguments every request of one multipart upload must repeat (the others go on its start).
_PER_PART_ARGS = (
    "ExpectedBucketOwner",
    "SSECustomerAlgorithm",
    "SSECustomerKey",
    "SSECustomerKeyMD5",
    "RequestPayer",
)


class S3Store(RepositoryStore):
    """``s3://bucket/path`` through MLflow's configured boto3 client."""

    # Glacier Instant Retrieval: cheap storage, still read at once (no restore step)
    cold_class = "GLACIER_IR"
    hot_class = "STANDARD"

    def _object(self, rel_path: str) -> tuple[Any, str, str]:
        repo = self._repo
        bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
        return repo._get_s3_client(), bucket, posixpath.join(prefix, rel_path)

    def set_storage_class(self, rel_path: str, storage_class: str) -> None:
        client, bucket, key = self._object(rel_path)
        source = {"Bucket": bucket, "Key": key}
        # A copy onto itself: boto3's managed copy (multipart beyond 8 MiB, so past S3's
        # 5 GB single-copy limit too) keeps the metadata and sets the new class.
        self._run(
            lambda: client.copy(source, bucket, key, ExtraArgs={"StorageClass": storage_class}),
            f"move {rel_path} to {storage_class} in",
        )

    def storage_class(self, rel_path: str) -> str:
        client, bucket, key = self._object(rel_path)
        head = self._run(lambda: client.head_object(Bucket=bucket, Key=key), "read")
        return str(head.get("StorageClass") or "STANDARD")  # S3 omits it for STANDARD

    def _sink(self, directory: str, name: str) -> PartSink | None:
        repo = self._repo
        try:
            client = repo._get_s3_client()
            bucket, prefix = repo.parse_s3_compliant_uri(repo.artifact_uri)
            extra: dict[str, Any] = dict(repo._bucket_owner_params)
            extra.update(repo.get_s3_file_upload_extra_args() or {})
        except AttributeError:  # another MLflow layout: stage the file and use its public API
            logger.debug("MLflow's S3 repository changed shape; staging uploads locally")
            return None
        content_type, encoding = mimetypes.guess_type(name)
        if content_type:
            extra.setdefault("ContentType", content_type)
        if encoding:
            extra.setdefault("ContentEncoding", encoding)
        return _S3Object(client, bucket, posixpath.join(prefix, directory, name), extra)


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
