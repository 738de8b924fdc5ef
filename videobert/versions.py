"""Versioned artifact directories: `<root>/<version>/<meta file>`, newest by (created_at, version).

The codebook and the text tokenizer each save into such a directory and write their metadata
JSON last, so a directory that holds it is complete; this is their shared registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from videobert import storage
from videobert.config import S3Config


def list_versions(root_uri: str, meta_file: str, s3: S3Config | None = None) -> list[dict[str, Any]]:
    """Metadata JSON of every complete version under `root_uri`, each with its directory as `uri`."""
    found = []
    for meta_uri in storage.list_files(root_uri, s3, suffix="/" + meta_file):
        meta = json.loads(storage.read_bytes(meta_uri, s3))
        meta["uri"] = meta_uri[: -len(meta_file) - 1]
        found.append(meta)
    return found


def recency(meta: dict[str, Any]) -> tuple[str, str]:
    """Sort key, oldest first: created_at (ISO 8601 UTC sorts as text), then version for ties."""
    return (meta.get("created_at", ""), meta["version"])


def newest(metas: Iterable[dict[str, Any]], **required_fields: Any) -> dict[str, Any] | None:
    """The newest of `metas` whose fields equal `required_fields` (None matches any), or None."""
    matches = [
        meta
        for meta in metas
        if all(value is None or meta.get(name) == value for name, value in required_fields.items())
    ]
    return max(matches, key=recency, default=None)
