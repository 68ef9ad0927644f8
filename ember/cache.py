"""A content-addressed on-disk cache shared by every job (factorizations, chosen deltas, ...).

An entry lives in ``<root>/<kind>/<label>/<key-hash>/`` as ``payload.pt`` plus ``manifest.json``
(the full key and the payload's SHA-256). Entries are written atomically under an inter-process
lock, so concurrent jobs build an entry once and never read a half-written one; an entry whose
manifest, key or checksum does not match is treated as corrupt and rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ember.locking import atomic_write_bytes, atomic_write_json, cache_lock

log = logging.getLogger(__name__)


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_digest(modules: Sequence[ModuleType]) -> str:
    """16 hex digits of SHA-256 over the modules' source: part of a cache key, so that a result made by
    other code is not read back."""
    h = hashlib.sha256()
    for mod in modules:
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtifactCache:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.builds = 0

    def entry_dir(self, kind: str, label: str, key: dict[str, Any]) -> Path:
        return self.root / kind / label / key_hash(key)

    def _read(self, d: Path, key: dict[str, Any], repair: bool = False) -> Any | None:
        """The entry's payload, or None. Only a reader holding the entry's lock (``repair``) may delete a
        corrupt entry: without it, a payload with no manifest yet is another job's write in progress."""
        manifest_p, payload_p = d / "manifest.json", d / "payload.pt"
        if not manifest_p.exists() and not payload_p.exists():
            return None
        if not repair and not manifest_p.exists():
            return None  # written last: the entry is being built (or its builder crashed; the lock holder repairs it)
        try:
            manifest = json.loads(manifest_p.read_text())
            data = payload_p.read_bytes()
            if manifest.get("key") != json.loads(json.dumps(key, default=str)):
                raise ValueError("key mismatch")
            if manifest.get("sha256") != _sha256(data):
                raise ValueError("checksum mismatch")
            return torch.load(io.BytesIO(data), weights_only=False)
        except Exception as exc:  # corrupt or stale: rebuild
            if not repair:
                return None  # possibly mid-rewrite; checked again under the lock
            log.warning("cache entry %s is corrupt or stale (%s); rebuilding", d, exc)
            shutil.rmtree(d, ignore_errors=True)
            return None

    def get(self, kind: str, label: str, key: dict[str, Any]) -> Any | None:
        return self._read(self.entry_dir(kind, label, key), key)

    def put(self, kind: str, label: str, key: dict[str, Any], payload: Any) -> Path:
        d = self.entry_dir(kind, label, key)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        atomic_write_bytes(d / "payload.pt", data)
        atomic_write_json(d / "manifest.json", {"key": key, "sha256": _sha256(data), "bytes": len(data)})
        return d

    def get_or_build(self, kind: str, label: str, key: dict[str, Any], build: Callable[[], Any]) -> Any:
        d = self.entry_dir(kind, label, key)
        found = self._read(d, key)
        if found is not None:
            self.hits += 1
            return found
        with cache_lock(d):
            found = self._read(d, key, repair=True)  # another process may have built it while we waited
            if found is not None:
                self.hits += 1
                return found
            payload = build()
            self.put(kind, label, key, payload)
            self.builds += 1
            return payload
