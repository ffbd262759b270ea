"""The state of a batch of decoding episodes and the buffers of a step's outcome (numpy; leading axis B everywhere).

The per-episode scalars live in three packed arrays (``counters``, ``amounts``, ``flags``) that the step
kernel takes whole; the named attributes (``token``, ``layer``, ...) are views of their columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from wide_env.sim.decode import kernel as k
from wide_env.sim.decode.plan import TokenPlan, assign_plan, concat_plans, take_plan
from wide_env.sim.outcome import Outcome, OutcomeFields


#: the named per-episode columns: name -> (packed array, column); each is a view kept on the state (an attribute,
#: not a property: the step path and the model backend read them every step)
COLUMNS = {
    "token": ("counters", k.TOKEN),  # (B,) token index within the episode
    "layer": ("counters", k.LAYER),  # (B,) current MoE layer
    "chunk_start": ("counters", k.CHUNK_START),  # (B,) token index of the plan's first token
    "start": ("counters", k.START),  # (B,) trace position of token 0
    "budget_used": ("amounts", k.BUDGET_USED),  # (B,) weighted deviation spent this token / episode
    "context": ("amounts", k.CONTEXT),  # (B,) the accuracy rule's context term (earlier tokens' losses, decaying)
    "done": ("flags", k.DONE),  # (B,) episode over (truncated)
}


@dataclass
class DecodeState:
    """B decoding episodes. The channel arrays describe the last planned token."""

    positions: np.ndarray  # (B, N, 2) helper positions, m
    waypoints: np.ndarray  # (B, N, 2) mobility targets
    speeds: np.ndarray  # (B, N) m/s
    path_state: np.ndarray  # (B, N, P) the path-loss model's per-link state (line of sight, shadowing)
    path_gain: np.ndarray  # (B, N) linear
    fading: np.ndarray  # (B, N, S) fading model state
    queue_last: np.ndarray  # (B, N) s, each helper's queueing delay at the last planned epoch
    counters: np.ndarray  # (B, 4) int64: token, layer, chunk_start (token of the plan's first), start (trace position)
    amounts: np.ndarray  # (B, 2 + MAX_ACC_DIM) float64: budget_used (this token / episode), context, the accumulator
    flags: np.ndarray  # (B, 1) bool: done
    plan: TokenPlan | None = None
    #: the step kernel's arguments for this state; None after the plan's arrays were replaced
    kernel_args: tuple | None = None

    def __post_init__(self):
        for name, (packed, index) in COLUMNS.items():  # token, layer, ...: views of the packed columns
            self.__dict__[name] = getattr(self, packed)[:, index]

    @classmethod
    def new(cls, positions, waypoints, speeds, path_state, path_gain, fading, queue_last, start) -> "DecodeState":
        """Episodes at token 0, layer 0, with nothing spent."""
        B = start.shape[0]
        counters = np.zeros((B, 4), dtype=np.int64)
        counters[:, k.START] = start
        flags = np.zeros((B, 1), dtype=bool)
        return cls(positions=positions, waypoints=waypoints, speeds=speeds, path_state=path_state, path_gain=path_gain,
                   fading=fading, queue_last=queue_last,
                   counters=counters, amounts=np.zeros((B, k.ACC + k.MAX_ACC_DIM)), flags=flags)

    @property
    def batch_size(self) -> int:
        return self.counters.shape[0]

    def __getstate__(self) -> dict:  # pickle / deepcopy: the kernel's arguments and the column views are rebuilt
        state = {key: value for key, value in self.__dict__.items() if key not in COLUMNS}
        state["kernel_args"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def take(self, rows) -> "DecodeState":
        """Episodes ``rows`` as a new state (copies): e.g. sub-env b of a batch as a batch of one."""
        rows = np.atleast_1d(np.asarray(rows))
        arrays = {f.name: getattr(self, f.name)[rows].copy() for f in fields(self) if f.name not in _NOT_ARRAYS}
        return DecodeState(**arrays, plan=take_plan(self.plan, rows))

    @classmethod
    def concat(cls, states: list["DecodeState"]) -> "DecodeState":
        """Several states (same plan chunk length) as one batch, in order."""
        if len(states) == 1:
            return states[0]
        arrays = {f.name: np.concatenate([getattr(s, f.name) for s in states]) for f in fields(cls)
                  if f.name not in _NOT_ARRAYS}
        return cls(**arrays, plan=concat_plans([s.plan for s in states]))

    def assign(self, rows: np.ndarray, other: "DecodeState") -> None:
        """Write state ``other`` (len(rows) episodes) into episodes ``rows``."""
        for f in fields(self):
            if f.name not in _NOT_ARRAYS:
                getattr(self, f.name)[rows] = getattr(other, f.name)
        assign_plan(self.plan, rows, other.plan)
        self.kernel_args = None


_NOT_ARRAYS = ("plan", "kernel_args")


FIELDS = OutcomeFields(k.FLOAT_FIELDS, k.INT_FIELDS)


def empty_outcome(batch: int, top_k: int) -> Outcome:
    """Outcome buffers the step kernel fills: the integer fields, then the K slots' servers, in ``counts``."""
    counts = np.empty((batch, _N_INTS + top_k), dtype=np.int64)
    return Outcome(np.empty((batch, _N_FLOATS)), counts, counts[:, _N_INTS:], FIELDS)


_N_FLOATS, _N_INTS = len(k.FLOAT_FIELDS), k.NI
