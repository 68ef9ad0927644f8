"""A GGUF file's model width and depth from its metadata header alone (the first kB; no tensor read).

Preflight uses it to check the factorization rank and method layers of a packaged model before the
first (slow) conversion. ``gguf.GGUFReader`` would parse every tensor's info (about 2.4 s for
SmolLM2) and cannot read a split file's parts, so this reads only the key-value section
(format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any

# GGUF metadata value types (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): scalars by struct format
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _PartsReader:
    """Sequential reads across the parts of a split file (read as if concatenated)."""

    def __init__(self, files: list[Any]) -> None:
        self._files = files

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n and self._files:
            chunk = self._files[0].read(n - len(out))
            if not chunk:
                self._files.pop(0)
            out += chunk
        if len(out) < n:
            raise EOFError("GGUF header ends early")
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]


def _gguf_value(r: _PartsReader, vtype: int) -> Any:
    """Read one metadata value; arrays are skipped (None), only their elements are read past."""
    if vtype in _GGUF_SCALARS:
        return r.unpack(_GGUF_SCALARS[vtype])
    if vtype == _GGUF_STRING:
        return r.read(r.unpack("<Q")).decode("utf-8", "replace")
    if vtype == _GGUF_ARRAY:
        etype, n = r.unpack("<I"), r.unpack("<Q")
        if etype in _GGUF_SCALARS:
            r.read(n * struct.calcsize(_GGUF_SCALARS[etype]))
        else:
            for _ in range(n):
                _gguf_value(r, etype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_header_dims(parts: list[Path]) -> tuple[int | None, int | None]:
    """``<arch>.embedding_length`` and ``<arch>.block_count`` from a GGUF file's metadata (its first kB:
    no tensor is read). ``parts``: the file, or the pieces of a split one in order."""
    with contextlib.ExitStack() as stack:
        r = _PartsReader([stack.enter_context(open(p, "rb")) for p in parts])
        if r.read(4) != b"GGUF" or r.unpack("<I") < 2:
            return None, None
        r.unpack("<Q")  # tensor count
        meta: dict[str, Any] = {}
        for _ in range(r.unpack("<Q")):
            key = r.read(r.unpack("<Q")).decode("utf-8", "replace")
            meta[key] = _gguf_value(r, r.unpack("<I"))
            arch = meta.get("general.architecture")
            d, n = meta.get(f"{arch}.embedding_length"), meta.get(f"{arch}.block_count")
            if isinstance(d, int) and isinstance(n, int):
                return d, n
    return None, None
