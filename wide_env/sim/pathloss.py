"""Large-scale path loss between the user device and its helpers, by name (docs/model.md, "Path loss").

A model implements :class:`PathLossModel` and is registered in :data:`PATH_LOSS_MODELS`; the config field
``channel.path_loss`` names one (None: the one ``radio.link_budget`` implies). A model may keep a state per
link for an episode (line of sight, shadowing), drawn when the helpers are placed; the gain follows the
distance as helpers move.

* ``power_law`` [paper]: G = A d^-alpha, A = 10^(reference_gain_db / 10), alpha = path_loss_exponent.
* ``3gpp_umi`` [std]: 3GPP TR 38.901 (V16.1) UMi street canyon, Table 7.4.1-1, with the LOS probability of
  Table 7.4.2-1 and log-normal shadow fading (sigma 4 dB LOS, 7.82 dB NLOS) drawn per link and episode
  [choice: no spatial correlation]. f_c in GHz, distances in m, d_3D from the antenna heights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from wide_env.sim.units import db_to_linear

SPEED_OF_LIGHT = 299_792_458.0  # m/s


def path_gain(distance_m, exponent: float, reference_gain_db: float = 0.0):
    """Large-scale power gain G = A * d^(-alpha) with A = 10^(reference_gain_db/10) [paper: A = 1, alpha = 4]."""
    return db_to_linear(reference_gain_db) * np.power(np.asarray(distance_m, dtype=np.float64), -exponent)


class PathLossModel(ABC):
    """Large-scale power gain of links from their 2-D distances (m) and a per-link state (..., n_state)."""

    name: str = "path_loss"
    n_state: int = 0

    def init(self, rng: np.random.Generator, distance_m: np.ndarray) -> np.ndarray:
        """The per-link state of new links (..., n_state); nothing by default."""
        return np.zeros(np.shape(distance_m) + (self.n_state,))

    @abstractmethod
    def gain(self, distance_m: np.ndarray, state: np.ndarray) -> np.ndarray:
        """Linear power gain of each link."""


class PowerLaw(PathLossModel):
    """G = A d^-alpha [paper: A = 1, alpha = 4]."""

    name = "power_law"

    def __init__(self, exponent: float, reference_gain_db: float = 0.0):
        self.exponent, self.reference_gain_db = float(exponent), float(reference_gain_db)

    @classmethod
    def from_config(cls, channel) -> "PowerLaw":
        return cls(channel.path_loss_exponent, channel.reference_gain_db)

    def gain(self, distance_m, state):
        return path_gain(distance_m, self.exponent, self.reference_gain_db)


class UMiStreetCanyon(PathLossModel):
    """3GPP TR 38.901 UMi street canyon [std]. State per link: (line of sight 0/1, shadow fading dB)."""

    name = "3gpp_umi"
    n_state = 2

    def __init__(self, carrier_ghz: float, helper_height_m: float, user_height_m: float, shadowing: bool = True):
        self.fc, self.h_bs, self.h_ut, self.shadowing = float(carrier_ghz), float(helper_height_m), \
            float(user_height_m), bool(shadowing)
        # breakpoint distance with effective heights h' = h - 1 m (environment height) [TR 38.901 Note 1]
        self.d_bp = 4.0 * (self.h_bs - 1.0) * (self.h_ut - 1.0) * self.fc * 1e9 / SPEED_OF_LIGHT

    @classmethod
    def from_config(cls, channel) -> "UMiStreetCanyon":
        return cls(channel.carrier_ghz, channel.helper_height_m, channel.user_height_m, channel.shadowing)

    @staticmethod
    def los_probability(distance_m):
        """Pr_LOS(d_2D) = 1 for d <= 18 m, else 18/d + exp(-d/36) (1 - 18/d) [TR 38.901 Table 7.4.2-1]."""
        d = np.maximum(np.asarray(distance_m, dtype=np.float64), 1e-9)
        return np.where(d <= 18.0, 1.0, 18.0 / d + np.exp(-d / 36.0) * (1.0 - 18.0 / d))

    def path_loss_db(self, distance_m, los):
        """PL in dB (without shadowing) for 2-D distances and line-of-sight flags."""
        d2 = np.asarray(distance_m, dtype=np.float64)
        d3 = np.sqrt(d2 * d2 + (self.h_bs - self.h_ut) ** 2)
        log_fc = np.log10(self.fc)
        pl1 = 32.4 + 21.0 * np.log10(d3) + 20.0 * log_fc
        pl2 = 32.4 + 40.0 * np.log10(d3) + 20.0 * log_fc - 9.5 * np.log10(self.d_bp ** 2 + (self.h_bs - self.h_ut) ** 2)
        pl_los = np.where(d2 <= self.d_bp, pl1, pl2)
        pl_nlos = 35.3 * np.log10(d3) + 22.4 + 21.3 * log_fc - 0.3 * (self.h_ut - 1.5)
        return np.where(np.asarray(los, dtype=bool), pl_los, np.maximum(pl_los, pl_nlos))

    def init(self, rng, distance_m):
        los = rng.random(np.shape(distance_m)) < self.los_probability(distance_m)
        sigma = np.where(los, 4.0, 7.82)
        shadow = rng.standard_normal(np.shape(distance_m)) * sigma if self.shadowing else np.zeros(np.shape(distance_m))
        return np.stack([los.astype(np.float64), shadow], axis=-1)

    def gain(self, distance_m, state):
        return db_to_linear(-(self.path_loss_db(distance_m, state[..., 0] > 0.5) + state[..., 1]))


#: name -> path-loss model class (config field ``channel.path_loss``); each has ``from_config(channel_config)``
PATH_LOSS_MODELS: dict[str, type[PathLossModel]] = {"power_law": PowerLaw, "3gpp_umi": UMiStreetCanyon}
#: the path-loss model each ``radio.link_budget`` implies when ``channel.path_loss`` is None
LINK_BUDGET_PATH_LOSS = {"paper": "power_law", "3gpp": "3gpp_umi"}


def make_path_loss(channel, radio) -> PathLossModel:
    """The path-loss model the config names (``channel.path_loss``, else the link budget's)."""
    name = channel.path_loss if channel.path_loss is not None else LINK_BUDGET_PATH_LOSS[radio.link_budget]
    return PATH_LOSS_MODELS[name].from_config(channel)
