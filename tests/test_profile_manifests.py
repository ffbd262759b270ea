"""Every profile is one data folder with a manifest: the shipped folders' manifests are valid, the profiles
resolve their trace, checkpoint and config from them, and a new folder with a manifest is a new profile."""

from __future__ import annotations

import json
import shutil

import pytest

from wide_env import WideConfig
from wide_env.gating import make_gating_source
from wide_env.profiles import (CHECKPOINT_FILES, DATA_DIR, MANIFEST_KEYS, MANIFEST_NAME, PROFILE_DATA, PROFILES,
                               ManifestError, accuracy_rule_validated, profile_checkpoint, profile_data_dir,
                               profile_trace, read_manifest)


def _folders():
    return [DATA_DIR] + sorted(p for p in DATA_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


@pytest.mark.parametrize("folder", _folders(), ids=lambda p: p.name)
def test_every_data_folder_has_a_valid_manifest(folder):
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert set(MANIFEST_KEYS) <= set(manifest)
    profile = read_manifest(folder)
    assert profile.name == ("tiny" if folder == DATA_DIR else folder.name)
    assert profile.trace.is_file() and all((profile.checkpoint / f).is_file() for f in CHECKPOINT_FILES)
    assert PROFILE_DATA[profile.name] == profile


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profiles_resolve_their_files_and_config_from_the_manifest(name):
    folder = profile_data_dir(name)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert profile_trace(name) == str(folder / manifest["trace"])
    assert profile_checkpoint(name) == str(folder / manifest["checkpoint"])
    assert PROFILES[name] == manifest["config"]
    cfg = WideConfig.from_dict({"profile": name})
    assert cfg.n_tokens == manifest["config"].get("n_tokens", cfg.n_tokens)
    if cfg.gating.source == "trace":
        assert make_gating_source(cfg).path == profile_trace(name)


def test_the_accuracy_rule_is_validated_where_a_manifest_says_so():
    validated = {name for name in PROFILES
                 if "accuracy_rule_validated" in json.loads((profile_data_dir(name) / MANIFEST_NAME).read_text())}
    assert validated == {"tiny"}
    assert accuracy_rule_validated(WideConfig.from_dict({"profile": "tiny"}))
    assert not accuracy_rule_validated(WideConfig.from_dict({"profile": "mixtral-8x7b"}))
    scale = PROFILE_DATA["tiny"].accuracy_rule_max_scale
    assert not accuracy_rule_validated(WideConfig.from_dict({"profile": "tiny", "budget": {"scale": 2 * scale}}))


def test_a_new_folder_with_a_manifest_is_a_profile(tmp_path):
    folder = tmp_path / "my-moe"
    folder.mkdir()
    for f in (*CHECKPOINT_FILES, "moe_trace.npz"):
        shutil.copy(DATA_DIR / f, folder / f)
    manifest = {"profile": "my-moe", "trace": "moe_trace.npz", "checkpoint": ".", "config": {"n_tokens": 3}}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    profile = read_manifest(folder)
    assert (profile.name, profile.trace, profile.checkpoint) == ("my-moe", folder / "moe_trace.npz", folder)
    assert profile.config == {"n_tokens": 3} and profile.accuracy_rule_max_scale is None


@pytest.mark.parametrize("change,message", [
    ({"profile": "other"}, "does not match its folder"),
    ({"trace": "missing.npz"}, "is not a file"),
    ({"checkpoint": "nowhere"}, "lacks"),
    ({"config": []}, "'config' must be a dict"),
    ({"trace": None}, "missing keys"),
])
def test_a_broken_manifest_names_the_problem(tmp_path, change, message):
    folder = tmp_path / "my-moe"
    folder.mkdir()
    for f in (*CHECKPOINT_FILES, "moe_trace.npz"):
        (folder / f).write_bytes(b"")
    manifest = {"profile": "my-moe", "trace": "moe_trace.npz", "checkpoint": ".", "config": {}}
    manifest.update(change)
    manifest = {k: v for k, v in manifest.items() if v is not None}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=message):
        read_manifest(folder)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(folder)
