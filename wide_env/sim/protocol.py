"""What the env front ends need of a phase's simulator: the :class:`Simulator` protocol.

:class:`wide_env.envs.batch.EpisodeBatch` drives the decoding simulator (:mod:`wide_env.sim.decode`) and the
prefill simulator (:mod:`wide_env.sim.prefill`) through these calls only; a new phase implements them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from wide_env.sim.outcome import Outcome, OutcomeFields


@runtime_checkable
class Simulator(Protocol):
    """A batched simulator of one inference phase (numpy state with leading axis B, no gymnasium)."""

    config: Any  #: the WideConfig
    source: Any  #: the gating source
    layout: dict  #: observation key -> (size, low, high), in the flat observation's order
    obs_slices: dict  #: observation key -> slice of the flat observation
    n_experts: int
    #: info keys a (re)set episode reports
    RESET_INFO_KEYS: tuple[str, ...]
    #: the named columns of a step's outcome (the first float field is the reward)
    outcome_fields: OutcomeFields

    def reset(self, rng, batch: int) -> Any:
        """New state of ``batch`` episodes; ``rng`` one generator, or a list of one per episode."""

    def reset_rows(self, rng, state, rows: np.ndarray) -> None:
        """Reset episodes ``rows`` (index array) of ``state`` in place."""

    def step(self, rng, state, executed: np.ndarray, obs: np.ndarray | None = None) -> Outcome:
        """Apply (B, ...) bool execution masks at each episode's position, advance, write the next observations."""

    # optional: ``outcome_buffer(batch) -> Outcome`` where ``step`` also takes ``out=`` (an outcome of B rows it
    # fills instead of a fresh one; the single env hands the same one every step)

    def observe(self, state, rows: np.ndarray | None = None, obs: np.ndarray | None = None) -> np.ndarray:
        """(B, D) float32 observations of the current positions (into ``obs`` for ``rows``)."""

    def view(self, state, *args) -> Any:
        """The current decision of every episode, for analytic policies."""

    def may_execute(self, state) -> np.ndarray:
        """(B, ...) bool: the action entries that may be 1 (the ``may be 1`` half of MaskablePPO's masks)."""

    def reset_info(self, state) -> dict[str, np.ndarray]:
        """The reset info (RESET_INFO_KEYS) of every episode, (B,) arrays."""

    def info_keys(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(float keys, int keys) of a step's info: outcome fields by name."""
