"""Observation -> network inputs, for the policy networks of :mod:`agents.networks`: every key scaled to O(1) by its
kind (:data:`SCALE_WIDTH`; the scales are described in :mod:`agents.networks`), and the expert-set network's
routing of each key, by its axes, to element features, (slot, choice) tables, per-node pools or globals
(:class:`KeyRouting`)."""

from __future__ import annotations

import torch as th

from agents.layout import KeySpec, LayoutSpec

__all__ = ["SCALE_WIDTH", "scale", "split_obs", "scaled_features", "scaled_dim", "KeyRouting"]

#: features per entry of each scale kind
SCALE_WIDTH = {"fraction": 1, "ratio": 3, "decibel": 1}
_ROUTED_ELSEWHERE = ("node", "slot", "choice")


def scale(x: th.Tensor, kind: str) -> th.Tensor:
    """(..., ) raw entries -> (..., SCALE_WIDTH[kind]) features of order one."""
    if kind == "fraction":
        return x.unsqueeze(-1)
    if kind == "decibel":
        return ((x + 80.0) / 20.0).clamp(-5.0, 5.0).unsqueeze(-1)
    if kind == "ratio":
        return th.stack([th.log10(x.clamp(min=0.0) + 1e-3) / 2.0, x.clamp(max=3.0), (x <= 1.0).float()], dim=-1)
    raise ValueError(f"unknown observation scale kind {kind!r}; expected one of {sorted(SCALE_WIDTH)}")


def split_obs(obs, spec: LayoutSpec) -> dict[str, th.Tensor]:
    """Dict of (B, *entry shape) tensors from a Dict batch or a flat (B, D) batch."""
    if isinstance(obs, dict):
        return {k.name: obs[k.name].reshape(-1, *k.shape) for k in spec.keys}
    return {k.name: obs[:, k.flat].reshape(-1, *k.shape) for k in spec.keys}


def scaled_features(obs, spec: LayoutSpec) -> th.Tensor:
    """The plain MLP's input: every key scaled to O(1), concatenated in layout order (B, D')."""
    o = split_obs(obs, spec)
    return th.cat([scale(o[k.name], k.scale).flatten(1) for k in spec.keys], dim=-1)


def scaled_dim(spec: LayoutSpec) -> int:
    return sum(k.size * SCALE_WIDTH[k.scale] for k in spec.keys)


class KeyRouting:
    """Which keys are element features, (slot, choice) tables, per-node or global, and their widths."""

    def __init__(self, spec: LayoutSpec, nodes_are_experts: bool = False):
        if nodes_are_experts:
            spec = _nodes_as_experts(spec)
        self.spec = spec
        elem = spec.element_axes
        if "expert" not in elem:
            raise ValueError(f"the expert-set network needs an 'expert' action axis, got {elem}")
        self.element, self.pair, self.node, self.glob = [], [], [], []
        self.n_element = self.n_pair = self.n_global = 0
        slots = set()
        for k in spec.keys:
            w = SCALE_WIDTH[k.scale]
            if k.axes[-2:] == ("slot", "choice"):
                prefix = k.axes[:-2]
                if not set(prefix) <= set(elem) or "expert" in prefix or _ordered(prefix + ("expert",), elem) is None:
                    raise ValueError(f"observation key {k.name!r}: a (slot, choice) table must run over element "
                                     f"axes {elem} before it, got axes {k.axes}")
                self.pair.append(k)
                self.n_pair += 2 * w + 2
                slots.add(k.shape[-2])
            elif "node" in k.axes:
                if any(a != "feature" for a in k.axes if a != "node"):
                    raise ValueError(f"observation key {k.name!r}: a per-node key may only add 'feature' axes, got {k.axes}")
                self.node.append(k)
                self.n_global += 2 * (k.size // k.shape[k.axes.index("node")]) * w
            elif any(a in elem for a in k.axes):
                if any(a in _ROUTED_ELSEWHERE for a in k.axes) or _ordered(tuple(a for a in k.axes if a in elem), elem) is None:
                    raise ValueError(f"observation key {k.name!r}: axes {k.axes} do not fit the element axes {elem}")
                self.element.append(k)
                n_elem_entries = 1
                for a, n in zip(k.axes, k.shape):
                    if a in elem:
                        n_elem_entries *= n
                self.n_element += (k.size // n_elem_entries) * w
            else:
                if any(a in _ROUTED_ELSEWHERE for a in k.axes):
                    raise ValueError(f"observation key {k.name!r}: axes {k.axes} cannot be routed")
                self.glob.append(k)
                self.n_global += k.size * w
        if len(slots) > 1:
            raise ValueError(f"(slot, choice) tables with different slot counts {sorted(slots)}")

    def inputs(self, obs) -> tuple[th.Tensor, th.Tensor | None, th.Tensor]:
        """(element features (B, *elem, F_e), pair features (B, *elem, K, F_p) or None, globals (B, F_g))."""
        spec = self.spec
        o = split_obs(obs, spec)
        B = next(iter(o.values())).shape[0]
        elem, shape = spec.element_axes, spec.element_shape
        glob = [scale(o[k.name], k.scale).reshape(B, -1) for k in self.glob]
        for k in self.node:
            x = scale(o[k.name], k.scale).movedim(1 + k.axes.index("node"), 1).reshape(B, k.shape[k.axes.index("node")], -1)
            glob += [x.mean(dim=1), x.max(dim=1).values]
        g = th.cat(glob, dim=-1) if glob else o[spec.keys[0].name].new_zeros(B, 0)
        own = [_to_elements(scale(o[k.name], k.scale), k.axes, elem, shape, B) for k in self.element]
        own_t = th.cat(own, dim=-1) if own else g.new_zeros(B, *shape, 0)
        pairs = [self._pair_features(o[k.name], k, elem, shape, B) for k in self.pair]
        return own_t, (th.cat(pairs, dim=-1) if pairs else None), g

    @staticmethod
    def _pair_features(raw: th.Tensor, k: KeySpec, elem, shape, B) -> th.Tensor:
        E = raw.shape[-1] - 1
        entry, skip = raw[..., :E], raw[..., E:].expand(*raw.shape[:-1], E)
        feats = th.cat([scale(entry, k.scale), scale(skip, k.scale), (entry < skip).float().unsqueeze(-1),
                        (entry == 0).float().unsqueeze(-1)], dim=-1)  # (B, *prefix, K, E, f)
        feats = feats.movedim(-3, -2)  # (B, *prefix, E, K, f): the choice axis is the element expert axis
        axes = k.axes[:-2] + ("expert",)
        order = _ordered(axes, elem)
        K = feats.shape[-2]
        x = feats.reshape(B, *[shape[elem.index(a)] for a in axes], K * feats.shape[-1])
        x = x.permute(0, *[1 + axes.index(a) for a in order], x.dim() - 1)
        for i, a in enumerate(elem):
            if a not in axes:
                x = x.unsqueeze(1 + i)
        x = x.expand(B, *shape, x.shape[-1])
        return x.reshape(B, *shape, K, feats.shape[-1])


def _nodes_as_experts(spec: LayoutSpec) -> LayoutSpec:
    """The layout with every per-node key's node axis read as the expert axis (one-to-one placement)."""
    E = spec.lengths["expert"]
    keys = []
    for k in spec.keys:
        if k.axes == ("node",):
            if k.shape != (E,):
                raise ValueError(f"nodes_are_experts: key {k.name!r} has {k.shape[0]} nodes for {E} experts; it "
                                 "needs the one-to-one placement (helper e hosts expert e)")
            k = KeySpec(k.name, ("expert",), k.shape, k.scale, k.flat)
        keys.append(k)
    return LayoutSpec(tuple(keys), spec.element_axes, spec.lengths)


def _ordered(axes: tuple[str, ...], elem: tuple[str, ...]) -> tuple[str, ...] | None:
    """``axes`` sorted in element order, or None when one is not an element axis."""
    if not all(a in elem for a in axes):
        return None
    return tuple(sorted(axes, key=elem.index))


def _to_elements(x: th.Tensor, axes: tuple[str, ...], elem: tuple[str, ...], shape: tuple[int, ...], B: int) -> th.Tensor:
    """(B, *key shape, w) -> (B, *element shape, F): element axes first in element order, the key's other
    axes folded into the features, missing element axes broadcast."""
    present = tuple(a for a in elem if a in axes)
    other = [i for i, a in enumerate(axes) if a not in elem]
    x = x.permute(0, *[1 + axes.index(a) for a in present], *[1 + i for i in other], x.dim() - 1)
    x = x.reshape(B, *[shape[elem.index(a)] for a in present], -1)
    for i, a in enumerate(elem):
        if a not in present:
            x = x.unsqueeze(1 + i)
    return x.expand(B, *shape, x.shape[-1])
