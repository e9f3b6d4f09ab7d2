"""Object stores behind one small interface: local files (the embedded default) and S3-compatible services."""
from storage.base import NotFound, StorageError, Store, check_key
from storage.local import LocalStore
from storage.uri import open_store, read_uri, split_uri

__all__ = ["LocalStore", "NotFound", "StorageError", "Store", "check_key", "open_store", "read_uri", "split_uri"]
