"""SDK clients built from MLflow's documented settings, with the SDK's own retries off.

Every remote call of a store runs under :func:`~mlflow_ckpt.storage.retry.with_retries`.
An SDK that retried as well would nest its attempts inside ours (botocore: 5 tries by
default, Azure: 11, google-cloud-storage: a 120 s deadline), turning a 6-try policy into
30 to 66 requests and minutes of waiting before a save could report a dead store. So each
client here is configured through its public constructor to try once, and ours is the one
retry layer.

The settings are those MLflow documents for its artifact repositories, read the way
MLflow reads them, so a store configured for ``mlflow.log_artifact`` works here unchanged:

* S3: ``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS``,
  ``MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE``, ``MLFLOW_EXPERIMENTAL_S3_SIGNATURE_VERSION``,
  ``MLFLOW_S3_EXPECTED_BUCKET_OWNER``, ``MLFLOW_S3_UPLOAD_EXTRA_ARGS``, and boto3's own
  credential chain (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL_S3``...);
* Azure: ``AZURE_STORAGE_CONNECTION_STRING``, else ``AZURE_STORAGE_ACCESS_KEY``, else
  ``DefaultAzureCredential``; TLS verification as MLflow's host credentials say;
* GCS: ``google.cloud.storage.Client()`` (application default credentials,
  ``STORAGE_EMULATOR_HOST``), an anonymous client when no credentials exist.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from mlflow.environment_variables import (
    MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE,
    MLFLOW_S3_ENDPOINT_URL,
    MLFLOW_S3_IGNORE_TLS,
    MLFLOW_S3_UPLOAD_EXTRA_ARGS,
)

from mlflow_ckpt.storage.base import StoreError
from mlflow_ckpt.storage.transfer import redact

T = TypeVar("T")


class Lazy(Generic[T]):
    """A client made on first use, once, whatever thread asks first. Making one may read
    credentials or reach a metadata endpoint, which a store that is never used must not
    do; once made, the SDK clients here are safe to share between threads."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._value: T | None = None

    def get(self) -> T:
        with self._lock:
            if self._value is None:
                self._value = self._make()
            return self._value


def s3_client() -> Any:
    """A boto3 S3 client as MLflow's S3 repository builds it, but trying each call once.

    ``total_max_attempts=1`` in the client's ``Config`` wins over ``AWS_MAX_ATTEMPTS`` and
    ``~/.aws/config``: whatever the environment says, botocore does not retry under us.
    A session per client: ``boto3.client`` shares one default session, which is not safe
    to use from several threads at once.
    """
    from boto3.session import Session
    from botocore.config import Config

    # MLflow's own (undocumented but honoured) switch for public buckets
    signature: Any = os.environ.get("MLFLOW_EXPERIMENTAL_S3_SIGNATURE_VERSION", "s3v4")
    if signature.lower() == "unsigned":
        from botocore import UNSIGNED

        signature = UNSIGNED
    config = Config(
        signature_version=signature,
        s3={"addressing_style": MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE.get()},
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    return Session().client(
        "s3",
        config=config,
        endpoint_url=MLFLOW_S3_ENDPOINT_URL.get(),
        verify=False if MLFLOW_S3_IGNORE_TLS.get() else None,
    )


def s3_bucket_owner() -> dict[str, str]:
    """``ExpectedBucketOwner`` for every S3 call, when ``MLFLOW_S3_EXPECTED_BUCKET_OWNER``
    is set (as MLflow's repository passes it).

    Read from the environment by name: MLflow's constant for it is newer than MLflow 3.0
    (importing it failed there), and the variable's name is the documented setting."""
    owner = os.environ.get("MLFLOW_S3_EXPECTED_BUCKET_OWNER")
    return {"ExpectedBucketOwner": owner} if owner else {}


def s3_upload_extra_args() -> dict[str, Any]:
    """The arguments ``MLFLOW_S3_UPLOAD_EXTRA_ARGS`` (JSON) adds to every upload."""
    text = MLFLOW_S3_UPLOAD_EXTRA_ARGS.get()
    return dict(json.loads(text)) if text else {}


def azure_service_client(artifact_uri: str, account: str, suffix: str) -> Any:
    """A ``BlobServiceClient`` with MLflow's credentials and ``retry_total=0``.

    ``retry_total`` is the storage SDK's documented retry setting (its default, 10, is
    what made a rejected key take a minute to report); 0 leaves one attempt per call.
    """
    from azure.storage.blob import BlobServiceClient
    from mlflow.utils.credentials import get_default_host_creds

    options: dict[str, Any] = {
        "connection_verify": get_default_host_creds(artifact_uri).verify,
        "retry_total": 0,
    }
    if "AZURE_STORAGE_CONNECTION_STRING" in os.environ:
        return BlobServiceClient.from_connection_string(
            os.environ["AZURE_STORAGE_CONNECTION_STRING"], **options
        )
    account_url = f"https://{account}.{suffix}"
    if "AZURE_STORAGE_ACCESS_KEY" in os.environ:
        credential: Any = os.environ["AZURE_STORAGE_ACCESS_KEY"]
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise StoreError(
                f"No Azure credentials for {redact(artifact_uri)}: set "
                "AZURE_STORAGE_CONNECTION_STRING or AZURE_STORAGE_ACCESS_KEY, or install "
                "azure-identity (pip install 'mlflow[azure]') to use DefaultAzureCredential."
            ) from None
        credential = DefaultAzureCredential()
    return BlobServiceClient(account_url=account_url, credential=credential, **options)


def gcs_client() -> Any:
    """A ``google.cloud.storage.Client`` as MLflow's GCS repository makes it.

    Its retries are per call: every call we make passes ``retry=None``.
    """
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client()
    except DefaultCredentialsError:
        return storage.Client.create_anonymous_client()


__all__ = [
    "azure_service_client",
    "gcs_client",
    "s3_bucket_owner",
    "s3_client",
    "s3_upload_extra_args",
]
