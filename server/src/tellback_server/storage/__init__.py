"""Object storage: an S3-compatible store (minio SDK) and a local-disk store."""

from tellback_server.storage.base import (
    ObjectInfo,
    ObjectStore,
    PresignedRequest,
    StorageError,
    UploadedPart,
)

__all__ = ["ObjectInfo", "ObjectStore", "PresignedRequest", "StorageError", "UploadedPart"]
