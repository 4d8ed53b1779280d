"""Speaker stores: the interface the service uses (``base``) and the local backend (``local``)."""

from service.store.base import (CollectionInfo, IndexOptions, SpeakerRecord, SpeakerStore, StoreCorrupt,
                                StoreUnavailable, quoted, validate_collection, validate_metadata, validate_speaker_id)
from service.store.keys import KeyFile, load_key_file
from service.store.local import LocalStore

__all__ = ["CollectionInfo", "IndexOptions", "SpeakerRecord", "SpeakerStore", "StoreCorrupt", "StoreUnavailable",
           "quoted", "validate_collection", "validate_metadata", "validate_speaker_id", "KeyFile", "load_key_file",
           "LocalStore"]
