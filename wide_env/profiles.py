"""Named scenario profiles: nested dicts of config overrides (JSON-able), merged under user overrides.

A profile is one folder of ``wide_env/data/`` (tiny's is the data directory itself) holding its shipped model
(``moe_lm.safetensors``, ``moe_lm.json``), its gating trace (``moe_trace.npz``) and a ``manifest.json``: the
profile's name, where its trace and checkpoint are (relative to the folder), its config overrides
(``config``) and, where measured, the budgets up to which its trace's accuracy rule agrees with the live model
(``accuracy_rule_validated``). A new profile is a new folder with its manifest; :func:`read_manifest` names
what is required. This module imports nothing from wide_env: configs, gating sources and tools import it.

``tiny`` (the default) replays the trace of the small byte-level MoE the project trains (4 layers,
8 experts, top-2, d_model 64; ``wide_env/modeltools``), so gates, mismatch tables, budgets and accuracy
effects are real; with ``gating.source = "synthetic"`` it uses the synthetic router at the same sizes; its
radio and timing numbers are our choices. Like the paper profiles it has no helper queueing by default
(every feasible expert meets the deadline); the registered ``WideMoE-Stragglers-v0`` preset adds 2 ms mean
queueing so that deadlines bite.

The three paper profiles mix two sources, as labelled in docs/real-model.md:

* **routing and accuracy from our E/K-matched model**: the default gating source is the trace of a byte-level
  MoE the project trained with the routing of the paper's model (E experts, Top-K, its routing rule, and
  as many MoE layers as one decoded token passes), so gates, mismatch tables, deviation budgets and
  accuracy are real (``wide_env/data/<profile>/``);
* **payload from the paper's model**: ``d_model`` (the uplink payload, ``radio.payload_d_model``), bandwidth B
  and deadline T_max are the SiftMoE paper's [paper]; the expert load and compute times are our estimates
  [choice]: load = expert weight bytes over PCIe Gen4 (~13 GB/s; the paper's 27 ms Mixtral figure),
  compute = weight bytes over ~300 GB/s edge-GPU memory bandwidth (batch-1 decoding is memory bound).

Their default deviation budget is the trace's ``layer_budget``: the per-layer budget at which SiftMoE loses
1 point of accuracy on the trace (the 0.5- and 2-point budgets are in the trace, ``calibrated_*``). With
``gating.source = "synthetic"`` they use the synthetic router with the paper's sizes and the paper's eps
(200 / 1.5 / 30); ``output_norm`` sets the synthetic mismatch scale so that the paper's eps is a meaningful
fraction of a typical weighted skip deviation [choice].

Switch-base-8 has 12 MoE layers, 6 in the encoder and 6 in the decoder [paper]; the encoder's run once on
the input, and each generated token passes the 6 decoder MoE layers, so the profile decodes through L = 6.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

#: the package's data directory: the one definition (profiles, tools and tests resolve files from it)
DATA_DIR = Path(__file__).resolve().parent / "data"
#: each profile folder's manifest file
MANIFEST_NAME = "manifest.json"
#: the profile a config without one uses
DEFAULT_PROFILE = "tiny"
#: keys every manifest has
MANIFEST_KEYS = ("profile", "trace", "checkpoint", "config")
#: the checkpoint's files (wide_env.models.moe_lm.load_checkpoint)
CHECKPOINT_FILES = ("moe_lm.safetensors", "moe_lm.json")


class ManifestError(ValueError):
    """A profile folder's manifest is missing, malformed or names files that are not there."""


@dataclass(frozen=True)
class ProfileData:
    """A profile as its data folder's manifest declares it."""

    name: str
    folder: Path
    trace: Path
    checkpoint: Path
    #: the profile's config overrides (a nested, JSON-able dict)
    config: Mapping[str, Any]
    #: the largest budget scale up to which the trace's accuracy rule is validated against the live model, or
    #: None where it is not (manifest key ``accuracy_rule_validated.max_budget_scale``)
    accuracy_rule_max_scale: float | None


def read_manifest(folder: Path) -> ProfileData:
    """The profile of a data folder, from its ``manifest.json``; raises :class:`ManifestError` naming the problem.
    Required: ``profile`` (the folder's name, except tiny's at the data directory's root), ``trace`` (a file)
    and ``checkpoint`` (a folder with :data:`CHECKPOINT_FILES`), both relative to the folder, and ``config`` (a
    dict of config overrides)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: cannot read the profile manifest ({err})") from None
    missing = [k for k in MANIFEST_KEYS if k not in data] if isinstance(data, dict) else list(MANIFEST_KEYS)
    if missing:
        raise ManifestError(f"{path}: missing keys {missing} (required: {list(MANIFEST_KEYS)})")
    name = data["profile"]
    expected = DEFAULT_PROFILE if Path(folder) == DATA_DIR else Path(folder).name
    if name != expected:
        raise ManifestError(f"{path}: profile {name!r} does not match its folder (expected {expected!r})")
    if not isinstance(data["config"], dict):
        raise ManifestError(f"{path}: 'config' must be a dict of config overrides")
    trace, checkpoint = Path(folder) / data["trace"], Path(folder) / data["checkpoint"]
    if not trace.is_file():
        raise ManifestError(f"{path}: trace {trace} is not a file")
    absent = [f for f in CHECKPOINT_FILES if not (checkpoint / f).is_file()]
    if absent:
        raise ManifestError(f"{path}: checkpoint folder {checkpoint} lacks {absent}")
    validated = data.get("accuracy_rule_validated")
    scale = None if validated is None else float(validated["max_budget_scale"])
    return ProfileData(name, Path(folder), trace, checkpoint, data["config"], scale)


def _profile_folders() -> list[Path]:
    """The data directory (tiny's folder) and every sub-folder with a manifest, in name order."""
    return [DATA_DIR] + sorted(p.parent for p in DATA_DIR.glob(f"*/{MANIFEST_NAME}"))


#: every shipped profile, by name, as its manifest declares it
PROFILE_DATA: dict[str, ProfileData] = {d.name: d for d in map(read_manifest, _profile_folders())}
#: profile name -> its config overrides
PROFILES: dict[str, Mapping[str, Any]] = {name: d.config for name, d in PROFILE_DATA.items()}


def _profile(name: str) -> ProfileData:
    if name not in PROFILE_DATA:
        raise KeyError(f"unknown profile {name!r}; choose one of {sorted(PROFILE_DATA)}")
    return PROFILE_DATA[name]


def profile_data_dir(name: str) -> Path:
    """Directory of a profile's shipped model: its manifest, ``moe_lm.safetensors``, ``moe_lm.json``,
    ``moe_trace.npz`` (tiny's is the data directory itself)."""
    return _profile(name).folder


def profile_trace(profile: str) -> str:
    """The trace a profile reads when ``gating.trace_path`` is None: the one its manifest names."""
    return str(_profile(profile).trace)


def profile_checkpoint(profile: str) -> str:
    """The checkpoint the live backend runs when ``gating.checkpoint_dir`` is None: the one its manifest names."""
    return str(_profile(profile).checkpoint)


#: profiles whose shipped trace's accuracy rule (wide_env.gating.effects) agrees with the live model within 0.5
#: points in the scenario it was measured in (baselines.model_checks.agreement, docs/real-model.md), with the
#: largest budget scale the validation covered (manifest key ``accuracy_rule_validated``): tiny's default
#: scenario with per-layer budgets, SiftMoE at 1x / 2x / 4x -0.03 / -0.06 / -0.22 points. Elsewhere it is not
#: (measured: lost experts on Realistic +1.3 to +2.3 points, episode budgets +4, the deep paper-profile models up
#: to +20 at 4x), so there the accuracy figures are measured on the model.
ACCURACY_RULE_VALIDATED: dict[str, float] = {name: d.accuracy_rule_max_scale for name, d in PROFILE_DATA.items()
                                             if d.accuracy_rule_max_scale is not None}


def accuracy_rule_validated(config) -> bool:
    """Whether a config's accuracy rule is validated against the live model: the shipped trace of a profile in
    :data:`ACCURACY_RULE_VALIDATED`, in the profile's own scenario (model, placement, channel, radio, compute and
    deadline as the profile sets them, so the same experts execute and arrive), per-layer budgets of scale up to
    the profile's validated scale (tokens per episode, the observation layout, the reward and the budget scale
    may differ). A user's trace or any other scenario is not validated."""
    max_scale = ACCURACY_RULE_VALIDATED.get(config.profile)
    if max_scale is None or config.gating.trace_path is not None:
        return False
    if config.budget.mode != "layer" or config.budget.scale > max_scale:
        return False
    own = _VALIDATED_SCENARIOS.get(config.profile)
    if own is None:  # the profile's own scenario, built by the config's class (this module imports no config)
        own = _VALIDATED_SCENARIOS[config.profile] = type(config).from_dict({"profile": config.profile})
    same = ("model", "placement", "channel", "radio", "compute", "deadline")
    return (all(getattr(config, k) == getattr(own, k) for k in same) and config.gating.source == own.gating.source
            and replace(config.budget, scale=own.budget.scale) == own.budget)


_VALIDATED_SCENARIOS: dict[str, Any] = {}
