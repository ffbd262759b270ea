"""The observation layout as the networks see it, derived from :mod:`wide_env.sim.observation` only.

Every key comes with its axes (per expert, per (slot, choice), per node, per (token, expert), ...), its
entry shape and its scale kind, so networks route keys by what they describe, never by name: a new key
declared in ``wide_env/sim/observation.py`` reaches them without a change here. The opt-in model-state keys
(``gating.model_state``) are recognised by their presence (a Dict) or the space's size (a flat Box); being
global, they reach every expert token of the expert-set network as per-token context.
"""

from __future__ import annotations

from dataclasses import dataclass

from gymnasium import spaces

from wide_env.sim import observation as obs_layout


@dataclass(frozen=True)
class KeySpec:
    name: str
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    scale: str  # "fraction", "ratio" or "decibel"
    flat: slice  # the key's entries in the flat observation

    @property
    def size(self) -> int:
        return self.flat.stop - self.flat.start


@dataclass(frozen=True)
class LayoutSpec:
    """Keys in layout order, the action's axes (the set elements of the expert-set network) and axis lengths."""

    keys: tuple[KeySpec, ...]
    element_axes: tuple[str, ...]
    lengths: dict

    @property
    def element_shape(self) -> tuple[int, ...]:
        return tuple(self.lengths[a] for a in self.element_axes)

    @property
    def n_elements(self) -> int:
        n = 1
        for length in self.element_shape:
            n *= length
        return n


def layout_spec(observation_space: spaces.Space, n_experts: int | None = None, top_k: int | None = None,
                n_nodes: int | None = None, prompt_tokens: int | None = None) -> LayoutSpec:
    """The layout of a WIDE observation space: decoding, or prefill when ``prompt_tokens`` is given.

    Sizes come from the arguments (train.py fills them from ``env.unwrapped.problem``); for a decoding
    ``Dict`` space they may be left out and are read off the space."""
    prefill = prompt_tokens is not None
    axes = obs_layout.PREFILL_OBSERVATION_AXES if prefill else obs_layout.OBSERVATION_AXES
    if None in (n_experts, top_k, n_nodes):
        if prefill or not isinstance(observation_space, spaces.Dict):
            raise ValueError("a flat (Box) or prefill WIDE observation needs n_experts, top_k and n_nodes (and "
                             "prompt_tokens for prefill) in policy_kwargs; train.py fills them from "
                             "env.unwrapped.problem")
        n_experts, top_k, n_nodes = _decode_sizes(observation_space, axes)
    if prefill:
        layout = obs_layout.prefill_observation_layout(int(prompt_tokens), int(n_experts), int(top_k), int(n_nodes))
        lengths = obs_layout.axis_lengths(int(n_experts), int(top_k), int(n_nodes), int(prompt_tokens))
        element_axes = obs_layout.PREFILL_ACTION_AXES
    else:
        layout = obs_layout.observation_layout(int(n_experts), int(top_k), int(n_nodes))
        if _has_model_state(observation_space, layout):  # gating.model_state: per-token globals after the rest
            layout.update(obs_layout.MODEL_STATE_KEYS)
        lengths = obs_layout.axis_lengths(int(n_experts), int(top_k), int(n_nodes))
        element_axes = obs_layout.ACTION_AXES
    shapes = obs_layout.key_shapes(layout, axes, lengths)
    slices = obs_layout.observation_slices(layout)
    _check_space(observation_space, layout)
    keys = tuple(KeySpec(k, tuple(axes[k]), shapes[k], obs_layout.OBSERVATION_SCALES[k], slices[k]) for k in layout)
    return LayoutSpec(keys, tuple(element_axes), dict(lengths))


def _has_model_state(space: spaces.Space, layout) -> bool:
    """Whether a decoding space carries the model-state keys (``gating.model_state``) after ``layout``'s: a Dict
    by its keys, a flat Box by its size."""
    extra = obs_layout.MODEL_STATE_KEYS
    if isinstance(space, spaces.Dict):
        return set(extra) <= set(space.spaces)
    total = sum(size for size, _, _ in layout.values())
    return isinstance(space, spaces.Box) and space.shape == (total + sum(size for size, _, _ in extra.values()),)


def _decode_sizes(space: spaces.Dict, axes: dict) -> tuple[int, int, int]:
    """(E, K, N) of a decoding Dict space from the keys' axes: a per-expert key gives E, a per-node key N,
    a (slot, choice) key K."""
    sizes = {key: int(sub.shape[0]) for key, sub in space.spaces.items()}
    by_axes = {tuple(axes.get(k, ())): n for k, n in sizes.items()}
    try:
        E = by_axes[("expert",)]
        N = by_axes[("node",)]
        K = by_axes[("slot", "choice")] // (E + 1)
    except KeyError:
        raise ValueError(f"cannot read the sizes of this observation space (keys {sorted(sizes)}); pass "
                         "n_experts, top_k and n_nodes in policy_kwargs") from None
    return E, K, N


def _check_space(space: spaces.Space, layout) -> None:
    total = sum(size for size, _, _ in layout.values())
    if isinstance(space, spaces.Dict):
        got = {k: int(sub.shape[0]) for k, sub in space.spaces.items()}
        want = {k: size for k, (size, _, _) in layout.items()}
        if got != want:
            raise ValueError(f"observation space keys/sizes {got} do not match the WIDE layout {want}")
    elif not (isinstance(space, spaces.Box) and space.shape == (total,)):
        raise ValueError(f"observation space {space} does not match the flat WIDE layout of size {total}")
