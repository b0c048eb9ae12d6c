"""Content hashes that tie artefacts together (a usage report to its checkpoint, an extracted model's config to
its weights), so a file swapped or edited by hand is caught when it is read."""

from __future__ import annotations

import hashlib
import json
import os


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value) -> str:
    """Hex sha256 of a JSON-able value in canonical form (sorted keys, no spaces): equal content, equal hash."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
