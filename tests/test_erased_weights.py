"""The erased model saved as a weight difference: exact round trip, row-sparse storage, checksums."""

from __future__ import annotations

import copy

import torch

from ember.erased_weights import _changes, _diff_bytes, apply_diff, load_diff, save_diff, weight_diff


def _edit(model: torch.nn.Module) -> torch.nn.Module:
    edited = copy.deepcopy(model)
    with torch.no_grad():
        emb = edited.get_input_embeddings().weight
        emb[[3, 17, 40]] += torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(0))
        down = edited.model.layers[0].mlp.down_proj.weight
        down.mul_(1.5)  # every row changes: stored whole
    return edited


def test_round_trip_is_bit_exact_and_stores_only_changed_rows(tiny, tmp_path):
    base = tiny.model
    edited = _edit(base)
    diff = weight_diff(base, edited)
    emb_name = next(n for n, p in base.named_parameters() if p is base.get_input_embeddings().weight)
    assert diff[f"{emb_name}::rows"].tolist() == [3, 17, 40]
    assert diff[f"{emb_name}::values"].shape[0] == 3
    assert "model.layers.0.mlp.down_proj.weight::full" in diff
    assert not any(k.startswith("model.layers.1.") for k in diff)  # unchanged parameters are not stored

    rec = save_diff(tmp_path / "w.safetensors", base, edited)
    assert rec["bytes"] < sum(p.numel() * p.element_size() for p in base.parameters())
    restored = copy.deepcopy(base)
    apply_diff(restored, load_diff(tmp_path / "w.safetensors", rec["sha256"]))
    for (name, a), b in zip(restored.state_dict().items(), edited.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_identical_models_give_an_empty_diff(tiny):
    assert weight_diff(tiny.model, copy.deepcopy(tiny.model)) == {}


def test_a_corrupt_or_missing_file_is_refused(tiny, tmp_path):
    rec = save_diff(tmp_path / "w.safetensors", tiny.model, _edit(tiny.model))
    p = tmp_path / "w.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    assert load_diff(p, rec["sha256"]) is None
    assert load_diff(tmp_path / "absent.safetensors", rec["sha256"]) is None


def test_the_size_known_before_saving_is_the_saved_payload(tiny, tmp_path):
    """The cap is checked on an estimate made before anything is copied: it is the file less its header."""
    edited = _edit(tiny.model)
    estimate = _diff_bytes(edited, _changes(tiny.model, edited))
    rec = save_diff(tmp_path / "w.safetensors", tiny.model, edited)
    assert estimate > 0 and estimate <= rec["bytes"] <= estimate + 4096, (estimate, rec["bytes"])


def test_a_difference_over_the_cap_is_not_saved(tiny, tmp_path, caplog):
    edited = _edit(tiny.model)
    estimate = _diff_bytes(edited, _changes(tiny.model, edited))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"an earlier erasure's difference")
    rec = save_diff(path, tiny.model, edited, max_gib=(estimate - 1) / 2**30)
    assert "skipped" in rec and "file" not in rec and rec["bytes"] == estimate
    assert not path.exists() and "save_erased_weights_max_gib" in caplog.text
    assert "file" in save_diff(path, tiny.model, edited, max_gib=estimate / 2**30) and path.exists()
