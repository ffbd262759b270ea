"""The frozen scenario both phases share: every constant derived from a config and its gating source.

Decoding and prefill simulators hold one :class:`Scenario` and never re-derive a constant (host map, link
parameters, fading model, budgets in weighted units, the mismatch tables weighted by layer sensitivity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import numpy as np

from wide_env.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the simulator reads configs by attribute
    from wide_env.config import WideConfig
from wide_env.gating.base import GatingSource
from wide_env.sim.channel import FadingModel, make_fading
from wide_env.sim.pathloss import PathLossModel, make_path_loss
from wide_env.sim.physics import SCOPES, LinkParameters
from wide_env.sim.queues import QueueModel
from wide_env.sim.units import dbm_to_watt

#: what radio.link_budget sets when a field is left at None: noise figure (dB), amplifier efficiency,
#: circuit power (W), least output power (dBm; None = none)
LINK_BUDGETS = {"paper": {"noise_figure_db": 0.0, "pa_efficiency": 1.0, "circuit_power_w": 0.0,
                          "user_min_power_dbm": None},
                "3gpp": {"noise_figure_db": 9.0, "pa_efficiency": 0.35, "circuit_power_w": 0.1,
                         "user_min_power_dbm": -40.0}}


def per_row(rng) -> bool:
    """True when ``rng`` is a list of generators, one per episode of a batch (each episode then draws exactly
    what a batch of one draws); False for one generator driving the whole batch."""
    return isinstance(rng, (list, tuple))


def _frozen(a) -> np.ndarray:
    a = np.array(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class Scenario:
    """Constants of a WIDE scenario. L layers, E experts, K Top-K, N helpers (node 0 = the user device)."""

    config: WideConfig
    source: GatingSource
    n_layers: int
    n_experts: int
    top_k: int
    n_nodes: int  # helpers N
    n_tokens: int  # tokens per decoding episode
    hosts: np.ndarray  # (L, E) int64 node of each expert
    link: LinkParameters
    path_loss: PathLossModel
    fading: FadingModel
    queue: QueueModel
    scope_index: int  # the objective's energy scope (index into SCOPES)
    enforce_deadline: bool
    deadline_s: float
    budget_mode: str  # "layer", "token" or "episode"
    layer_budget: np.ndarray  # (L,) eps_l x scale, model units
    layer_weight: np.ndarray  # (L,) kappa_l (1 in layer mode)
    # the budget a token (token mode: sum_l kappa_l eps_l) or an episode (episode mode: n_tokens times that)
    # spends over its layer-steps, weighted units; NaN in layer mode
    span_budget: float
    budget_unit: np.ndarray  # (L,) the observation's deviation unit: eps_l, or the span budget
    weighted_mismatch: np.ndarray  # (L, E, E+1) kappa_l D_l: deviation tables directly in budget units
    same_hosts_every_layer: bool
    fading_per_layer: bool
    cost_per_layer: bool  # costs differ between layers (per-layer fading or per-layer host maps)
    local_experts: bool  # some expert runs on the device (node 0): node tables carry its column first
    # every layer maps expert e to node e of the node tables (helper e + 1 without a device column): the
    # tables are the experts' as they are, no gather
    one_to_one_hosts: bool

    @classmethod
    def build(cls, config: WideConfig, source: GatingSource) -> "Scenario":
        """Derive the constants; a config that disagrees with the source raises ConfigError naming both."""
        L, E, K = source.n_layers, source.n_experts, source.top_k
        budget = config.budget
        if budget.layer_weights is not None and len(budget.layer_weights) != L:
            raise ConfigError(f"config field 'budget.layer_weights' has {len(budget.layer_weights)} numbers but the "
                              f"gating source has {L} layers; give one weight per layer")
        if isinstance(config.placement.hosts, str):
            hosts = np.tile(np.arange(1, E + 1), (L, 1))
        else:
            hosts = np.asarray(config.placement.hosts, dtype=np.int64)
            if hosts.shape != (L, E):
                raise ConfigError(f"config field 'placement.hosts' has shape {hosts.shape}; the gating source needs "
                                  f"({L}, {E}) (layers, experts)")
        n_nodes = int(config.placement.n_helpers) if config.placement.n_helpers is not None else max(1, int(hosts.max()))
        if hosts.max() > n_nodes:
            raise ConfigError(f"config field 'placement.hosts' uses helper {hosts.max()} > placement.n_helpers "
                              f"({n_nodes})")
        ch, radio, comp = config.channel, config.radio, config.compute
        d_model = int(radio.payload_d_model) if radio.payload_d_model is not None else int(source.d_model)
        budget_defaults = LINK_BUDGETS[radio.link_budget]
        pick = {k: (getattr(radio, k) if getattr(radio, k) is not None else v) for k, v in budget_defaults.items()}
        link = LinkParameters(
            bits=float(d_model * radio.bits_per_element), bandwidth_hz=float(radio.bandwidth_hz),
            noise_psd_w_hz=float(dbm_to_watt(ch.noise_psd_dbm_hz + pick["noise_figure_db"])),
            user_max_power_w=float(dbm_to_watt(radio.user_max_power_dbm)),
            helper_power_w=float(dbm_to_watt(radio.helper_power_dbm)), deadline_s=float(config.deadline.deadline_s),
            load_time_s=float(comp.load_time_s), compute_time_s=float(comp.compute_time_s),
            helper_compute_power_w=float(comp.helper_compute_power_w),
            local_compute_power_w=float(comp.local_compute_power_w), uplink_model=radio.uplink_model,
            user_min_power_w=0.0 if pick["user_min_power_dbm"] is None else float(dbm_to_watt(pick["user_min_power_dbm"])),
            pa_efficiency=float(pick["pa_efficiency"]), circuit_power_w=float(pick["circuit_power_w"]))

        eps = np.full(L, budget.layer_budget) if budget.layer_budget is not None else source.layer_budget
        layer_budget = np.asarray(eps, dtype=np.float64) * budget.scale
        if budget.mode in ("token", "episode"):
            kappa = np.ones(L) if budget.layer_weights is None else np.asarray(budget.layer_weights, dtype=np.float64)
            if not (kappa > 0).all():  # deviations are reported in model units: Delta_l = weighted / kappa_l
                raise ConfigError(f"config field 'budget.layer_weights' = {list(budget.layer_weights)} has a weight "
                                  "<= 0; give every layer a positive sensitivity (a small one to count it little)")
            span_budget = float((layer_budget * kappa).sum()) * (config.n_tokens if budget.mode == "episode" else 1)
            if not span_budget > 0:
                raise ConfigError(f"config field 'budget.scale' = {budget.scale} gives a zero {budget.mode} budget; "
                                  "use a scale > 0")
            unit = np.full(L, span_budget)
        else:
            kappa = np.ones(L)
            span_budget = float("nan")
            if not (layer_budget > 0).all():
                raise ConfigError("config field 'budget.scale' must be > 0 in layer mode (a zero budget has no unit)")
            unit = layer_budget.copy()
        same_hosts = bool((hosts == hosts[0]).all())
        local = bool((hosts == 0).any())
        table_nodes = n_nodes + (1 if local else 0)  # the node tables' columns: the device's, then the helpers'
        one_to_one = same_hosts and table_nodes == E and bool((hosts[0] - (0 if local else 1) == np.arange(E)).all())
        return cls(
            config=config, source=source, n_layers=L, n_experts=E, top_k=K, n_nodes=n_nodes,
            n_tokens=int(config.n_tokens), hosts=_frozen(hosts), link=link, path_loss=make_path_loss(ch, radio),
            fading=make_fading(ch), queue=QueueModel(comp.queue_delay_mean_s, comp.queue_persistence),
            scope_index=SCOPES.index(radio.energy_scope), enforce_deadline=bool(config.deadline.enforce),
            deadline_s=link.deadline_s, budget_mode=budget.mode, layer_budget=_frozen(layer_budget),
            layer_weight=_frozen(kappa), span_budget=span_budget, budget_unit=_frozen(unit),
            weighted_mismatch=_frozen(source.mismatch * kappa[:, None, None]), same_hosts_every_layer=same_hosts,
            fading_per_layer=bool(ch.fading_per_layer), cost_per_layer=bool(ch.fading_per_layer or not same_hosts),
            local_experts=local, one_to_one_hosts=one_to_one)
