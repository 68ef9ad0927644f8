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


def _changes(base: nn.Module, edited: nn.Module) -> dict[str, torch.Tensor | None]:
    """Per changed parameter of ``edited``: the indices of its changed rows, or None to store it whole."""
    base_sd = base.state_dict()
    out: dict[str, torch.Tensor | None] = {}
    for name, new in edited.state_dict().items():
        old = base_sd.get(name)
        if old is None or old.shape != new.shape:
            raise ValueError(f"parameter {name!r} differs in shape or is missing in the base model")
        if torch.equal(old, new):
            continue
        out[name] = None
        if new.dim() >= 2:
            changed = (old != new).flatten(1).any(1).nonzero().squeeze(1)
            if changed.numel() < ROWS_FRACTION * new.shape[0]:
                out[name] = changed
    return out


def _diff_bytes(edited: nn.Module, changes: dict[str, torch.Tensor | None]) -> int:
    """What :func:`weight_diff` would hold, in bytes, before anything is copied."""
    sd = edited.state_dict()
    total = 0
    for name, rows in changes.items():
        t = sd[name]
        per_row = t[0].numel() * t.element_size() if t.dim() else t.element_size()
        total += t.numel() * t.element_size() if rows is None else rows.numel() * (per_row + 8)
    return total


def weight_diff(base: nn.Module, edited: nn.Module,
                changes: dict[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Tensors that turn ``base`` into ``edited``: ``<name>::rows``/``::values`` or ``<name>::full``, on the CPU."""
    changes = _changes(base, edited) if changes is None else changes
    sd = edited.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, rows in changes.items():
        new = sd[name]
        if rows is None:
            out[f"{name}::full"] = new.detach().to("cpu", copy=True).contiguous()
        else:
            out[f"{name}::rows"] = rows.to("cpu", torch.int64).contiguous()
            out[f"{name}::values"] = new[rows].detach().to("cpu", copy=True).contiguous()
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


def save_diff(path: Path, base: nn.Module, edited: nn.Module, max_gib: float | None = None) -> dict[str, object]:
    """Save the difference atomically; returns what the stage record keeps (file, sha256, size).

    A difference larger than ``max_gib`` (a base method that trains every MLP of an 8B model: about
    10 GiB per concept) is not saved, with a warning: the record says so, and a relaunch that needs the
    erased model recomputes the erasure instead of reading it."""
    changes = _changes(base, edited)
    size = _diff_bytes(edited, changes)
    if max_gib is not None and size > max_gib * 2**30:
        log.warning("the erased weights would take %.1f GiB, more than save_erased_weights_max_gib=%g: not saved "
                    "(a relaunch that needs the erased model recomputes the erasure); raise "
                    "save_erased_weights_max_gib to keep them", size / 2**30, max_gib)
        Path(path).unlink(missing_ok=True)  # an earlier erasure's file must not pass for this one
        return {"skipped": f"{size / 2**30:.1f} GiB > save_erased_weights_max_gib={max_gib:g}", "bytes": size}
    data = st_save(weight_diff(base, edited, changes))
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
