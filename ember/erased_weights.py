"""The erased model saved as a compact, checksummed difference from the base model.

A job whose erase stage finished but whose later stages did not (a kill, a crash, a new attack added
to the config) reloads the erased model from this file instead of re-running the delta grid and the
base method. Only parameters that changed are stored; for a matrix whose changed rows are a minority
(the EMBER edit touches a few hundred embedding rows) only those rows and their indices are kept. The
values are stored exactly (same dtype), so the reloaded model is bit-identical to the one erased.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ember.locking import atomic_write_bytes

log = logging.getLogger(__name__)

ROWS_FRACTION = 0.5  # store row indices + rows when fewer than this fraction of a matrix's rows changed


def weight_diff(base: nn.Module, edited: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that turn ``base`` into ``edited``: ``<name>::rows``/``::values`` or ``<name>::full``, on the CPU."""
    base_sd = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, new in edited.state_dict().items():
        old = base_sd.get(name)
        if old is None or old.shape != new.shape:
            raise ValueError(f"parameter {name!r} differs in shape or is missing in the base model")
        if torch.equal(old, new):
            continue
        if new.dim() >= 2:
            changed = (old != new).flatten(1).any(1).nonzero().squeeze(1)
            if changed.numel() < ROWS_FRACTION * new.shape[0]:
                out[f"{name}::rows"] = changed.to("cpu", torch.int64).contiguous()
                out[f"{name}::values"] = new[changed].detach().to("cpu", copy=True).contiguous()
                continue
        out[f"{name}::full"] = new.detach().to("cpu", copy=True).contiguous()
    return out


def apply_diff(model: nn.Module, diff: dict[str, torch.Tensor]) -> None:
    """Write ``diff`` (from :func:`weight_diff`) into ``model`` in place."""
    sd = model.state_dict()
    names = {k.rsplit("::", 1)[0] for k in diff}
    unknown = sorted(n for n in names if n not in sd)
    if unknown:
        raise KeyError(f"the saved erased weights name parameters this model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name in names:
            target = sd[name]
            if f"{name}::full" in diff:
                target.copy_(diff[f"{name}::full"])  # copy_ moves across devices
            else:  # the saved tensors are on the CPU; the model may be on a GPU
                rows = diff[f"{name}::rows"].to(target.device)
                target[rows] = diff[f"{name}::values"].to(target.device, target.dtype)


def save_diff(path: Path, base: nn.Module, edited: nn.Module) -> dict[str, object]:
    """Save the difference atomically; returns what the stage record keeps (file, sha256, size)."""
    data = st_save(weight_diff(base, edited))
    atomic_write_bytes(Path(path), data)
    return {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def load_diff(path: Path, sha256: str | None) -> dict[str, torch.Tensor] | None:
    """The saved difference, or None (with a warning) when the file is missing or does not match its checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        log.warning("%s does not match its recorded checksum: the erasure will be recomputed", path)
        return None
    return st_load(data)
