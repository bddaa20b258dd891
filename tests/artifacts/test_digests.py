"""Trained weights are identified by content: a retrain to identical bytes reuses predictions."""

from __future__ import annotations

import hashlib
import os

import palign.artifacts.digests as digests
from palign.artifacts.digests import DIGESTS_FILE, file_digests


def test_digests_follow_content_not_write_time_and_are_hashed_once_per_version(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights" * 1000)
        (folder / "config.json").write_text("{}")
    os.utime(second / "model.safetensors", ns=(1, 1))  # same bytes, other mtime
    assert (
        file_digests(first)
        == file_digests(second)
        == {"model.safetensors": hashlib.sha256(b"weights" * 1000).hexdigest()}
    )
    assert (first / DIGESTS_FILE).exists()

    hashed = []
    real_sha256 = hashlib.sha256
    monkeypatch.setattr(digests.hashlib, "sha256", lambda: hashed.append(1) or real_sha256())
    file_digests(first)
    assert hashed == []  # the sidecar answered
    (first / "model.safetensors").write_bytes(b"weights" * 999 + b"changed")
    changed = file_digests(first)
    assert hashed == [1] and changed != file_digests(second)


def test_a_stage_store_is_named_by_its_identity_and_reopens_with_its_records(tmp_path):
    from palign.artifacts.readers import read_json
    from palign.artifacts.stores import open_stage_store, stage_folder

    identity = {"model": "m", "sampling": {"temperature": 0.6}}
    folder = stage_folder(tmp_path, identity, "binary-sentence")
    assert folder == stage_folder(
        tmp_path, dict(reversed(identity.items())), "binary-sentence"
    )  # key order does not count
    assert folder != stage_folder(tmp_path, {**identity, "model": "n"}, "binary-sentence")
    assert folder.name.startswith("binary-sentence-")
    with open_stage_store(folder, identity, key="key") as store:
        store.add({"key": "a", "value": 1})
    assert read_json(folder / "settings.json") == identity
    with open_stage_store(folder, identity, key="key") as again:
        assert "a" in again and again.get("a")["value"] == 1
