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


GGUF_TO_HF = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
              "feed_forward_length": "intermediate_size"}


def gguf_header_config(parts: list[Path]) -> dict[str, int]:
    """The model sizes in a GGUF file's metadata (its first kB: no tensor is read), under their
    transformers names: ``<arch>.embedding_length`` -> ``hidden_size``, ``block_count`` ->
    ``num_hidden_layers``, ``feed_forward_length`` -> ``intermediate_size``; ``{}`` when the file is
    no GGUF. ``parts``: the file, or the pieces of a split one in order."""
    with contextlib.ExitStack() as stack:
        r = _PartsReader([stack.enter_context(open(p, "rb")) for p in parts])
        if r.read(4) != b"GGUF" or r.unpack("<I") < 2:
            return {}
        r.unpack("<Q")  # tensor count
        meta: dict[str, Any] = {}
        found: dict[str, int] = {}
        for _ in range(r.unpack("<Q")):
            key = r.read(r.unpack("<Q")).decode("utf-8", "replace")
            meta[key] = _gguf_value(r, r.unpack("<I"))
            arch = meta.get("general.architecture")
            found = {hf: v for g, hf in GGUF_TO_HF.items() if isinstance(v := meta.get(f"{arch}.{g}"), int)}
            if len(found) == len(GGUF_TO_HF):
                break
        return found


def gguf_header_dims(parts: list[Path]) -> tuple[int | None, int | None]:
    """(width, depth) from the GGUF header; (None, None) when unknown."""
    c = gguf_header_config(parts)
    if "hidden_size" not in c or "num_hidden_layers" not in c:
        return None, None
    return c["hidden_size"], c["num_hidden_layers"]
