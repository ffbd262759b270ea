"""B episodes of one simulator as every env front end drives them (single env = a batch of one, the
Gymnasium vector env and the SB3 VecEnv = batches of B). Phase-generic: decoding and prefill simulators
implement :class:`wide_env.sim.protocol.Simulator`.

One step writes each output once, in this order: the simulator's step (its outcome fields; no observation
yet where a model backend routes the next layers), the model backend (its measured fields and extra columns,
named by :attr:`EpisodeBatch.fields`), the observation, then the reward, summed once from its terms
(:func:`wide_env.rules.compose_reward`; the kernel sums it itself when no model backend is attached).
"""

from __future__ import annotations

import numbers
import operator

import numpy as np

from wide_env.envs.accuracy_source import resolve_accuracy_source
from wide_env.envs.dict_display import dict_function
from wide_env.envs.model_backend import model_backend_for
from wide_env.sim.outcome import Outcome, OutcomeFields
from wide_env.rules import REWARD_TERMS, compose_reward


class EpisodeBatch:
    """The simulator, the state of ``num_envs`` episodes, their latest observation, per-row step counts
    (``max_episode_steps``) and autoreset flags. All randomness comes from the generator passed in."""

    def __init__(self, sim, num_envs: int, max_episode_steps: int | None = None):
        if isinstance(num_envs, bool) or not isinstance(num_envs, numbers.Integral) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if max_episode_steps is not None and (isinstance(max_episode_steps, bool) or
                                              not isinstance(max_episode_steps, numbers.Integral) or
                                              max_episode_steps < 1):
            raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
        self.sim = sim
        self.num_envs = int(num_envs)
        self.max_episode_steps = None if max_episode_steps is None else int(max_episode_steps)
        #: the checkpoint's part in decoding (wide_env.envs.model_backend): live gating, or the accuracy measured
        #: on the model; None where the simulator's own figures are all
        #: where the accuracy figures come from (wide_env.envs.accuracy_source), resolved once here
        self.accuracy_source = resolve_accuracy_source(sim)
        self.model = model_backend_for(sim, self.num_envs, self.accuracy_source)
        #: step info keys: the simulator's (then the model's extra columns, with live gating), float then int
        self.float_keys, self.int_keys = sim.info_keys()
        #: the named columns of this batch's outcomes: the simulator's, then the model's extra float columns
        self.fields = sim.outcome_fields
        if self.model is not None:
            sim.leave_to_model()  # the model measures accuracy; the reward is summed after it (step)
            assert all(self.fields.index[term][0] == 0 for term in REWARD_TERMS), "the reward's terms are float fields"
            self._term_cols = [self.fields.index[term][1] for term in REWARD_TERMS]
            self._terms_of = operator.itemgetter(*self._term_cols)  # a row's terms from its values (a list)
            extra = self.model.extra_keys
            self.float_keys += extra
            self.fields = OutcomeFields(self.fields.floats + extra, self.fields.ints)
        self.info_keys = self.float_keys + self.int_keys
        self._float_cols = [self.fields.index[key][1] for key in self.float_keys]
        self._int_cols = [self.fields.index[key][1] for key in self.int_keys]
        self._reward_col = self.fields.index["reward"][1]
        self._float_span, self._int_span = _span(self._float_cols), _span(self._int_cols)
        self._row_dict = self._row_function()
        self.reset_info_keys = sim.RESET_INFO_KEYS
        self.only_step_keys = tuple(k for k in self.info_keys if k not in self.reset_info_keys)
        self.state = None
        self.obs: np.ndarray | None = None  # (B, D) float32, the current observations (fresh after each call)
        self.elapsed = np.zeros(self.num_envs, dtype=np.int64)
        self.pending = np.zeros(self.num_envs, dtype=bool)  # episode over at the previous step (autoreset)
        self._out = self._outcome_buffer()
        #: step_one goes straight to the simulator's step_one (no model backend, an outcome buffer of its own)
        self._lean = self.model is None and self._out is not None and hasattr(sim, "step_one")

    def __getstate__(self) -> dict:  # pickle / deepcopy: the outcome buffer's views are rebuilt, not copied apart
        state = dict(self.__dict__)
        state["_out"] = None
        state["_row_dict"] = None  # a compiled function: made again
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._out = self._outcome_buffer()
        self._row_dict = self._row_function()

    def _outcome_buffer(self):
        """The single env's outcome, filled step after step, where the simulator fills a caller's outcome."""
        buffer = getattr(self.sim, "outcome_buffer", None)
        return buffer(self.num_envs) if buffer is not None and self.num_envs == 1 else None

    # ---- resets ----------------------------------------------------------------------------------
    def reset_all(self, rng: np.random.Generator) -> None:
        self.state = self.sim.reset(rng, self.num_envs)
        if self.model is not None:  # before observing: live gating replaces the trace's
            self.model.start(self.state)
        self.obs = self.sim.observe(self.state)
        if self.model is not None and self.model.observes:
            self.model.observe(self.obs)
        self.elapsed[:] = 0
        self.pending[:] = False

    def reset_rows(self, rng: np.random.Generator, rows: np.ndarray) -> None:
        """Reset rows (index array); all rows at once go through a plain reset (same draws, no copies)."""
        if rows.size == self.num_envs:
            return self.reset_all(rng)
        self.sim.reset_rows(rng, self.state, rows)
        if self.model is not None:
            self.model.start(self.state, rows)
        mask = np.zeros(self.num_envs, dtype=bool)
        mask[rows] = True
        self.obs = self.sim.observe(self.state, mask, self.obs.copy())
        if self.model is not None and self.model.observes:
            self.model.observe(self.obs, rows)
        self.elapsed[rows] = 0
        self.pending[rows] = False

    # ---- one step --------------------------------------------------------------------------------
    def step(self, rng: np.random.Generator, executed: np.ndarray):
        """Step every row not yet finished (finished rows report zeros); returns (outcome, truncated (B,)).
        The observations after the step are in ``self.obs`` (a fresh array)."""
        self.obs = obs = np.empty_like(self.obs)
        outcome = self._advance(rng, executed, obs, None)
        truncated = self.state.done.copy()
        if self.max_episode_steps is not None:
            self.elapsed += 1
            truncated |= self.elapsed >= self.max_episode_steps
        return outcome, truncated

    def step_one(self, rng: np.random.Generator, executed: np.ndarray, obs: np.ndarray) -> tuple[float, bool, dict]:
        """The single env's step (a batch of one): the observation after it goes into ``obs`` ((1, D) float32,
        C-contiguous and writeable, a fresh row the caller hands over (wide_env.envs.observation_rows); then
        ``self.obs``); returns the reward, whether the episode is over
        (truncated) and the info as Python numbers (:meth:`step_result_one`). A simulator that fills a caller's
        outcome (``outcome_buffer``) fills the same one every step: its values leave as Python numbers."""
        self.obs = obs
        out = self._out
        if self._lean:  # the usual single env: the simulator's step is all
            state = self.state
            self.sim.step_one(rng, state, executed, obs, out)
            reward, info = self._row_dict(out.values.tolist()[0], out.counts.tolist()[0])
            truncated = state.done.item(0)  # a Python bool
            if self.max_episode_steps is not None:
                self.elapsed += 1
                truncated = truncated or bool(self.elapsed[0] >= self.max_episode_steps)
            return reward, truncated, info
        if self.model is None and out is not None:
            outcome = self.sim.step(rng, self.state, executed, obs, out=out)
        else:
            outcome = self._advance(rng, executed, obs, out, compose=False, one=True)
        values = outcome.values.tolist()[0]
        if self.model is not None:  # the reward once every producer wrote its terms, on the row's numbers
            values[self._reward_col] = _compose_one(*self._terms_of(values))
        reward, info = self._row_dict(values, outcome.counts.tolist()[0])
        truncated = self.state.done.item(0)  # a Python bool
        if self.max_episode_steps is not None:
            self.elapsed += 1
            truncated = truncated or bool(self.elapsed[0] >= self.max_episode_steps)
        return reward, truncated, info

    def _advance(self, rng: np.random.Generator, executed: np.ndarray, obs: np.ndarray, out, compose: bool = True,
                 one: bool = False):
        """The simulator's step, then the model backend's part, the observation and the reward (the order of the
        module docstring); ``out``: the outcome buffer to fill (None: a fresh one); ``compose=False`` leaves the
        reward column (with a model backend) to the caller; ``one``: :meth:`step_one`'s call (``obs`` a fresh
        row), whose simulator step goes through the simulator's single-env entry."""
        state, model, sim = self.state, self.model, self.sim
        if model is None:
            return sim.step(rng, state, executed, obs) if out is None else sim.step(rng, state, executed, obs, out=out)
        before = model.before_step(state, executed)
        observe = not model.routes_gating  # else observe after the model routed the next layers
        if out is None:
            outcome = sim.step(rng, state, executed, obs, observe=observe)
        elif one and observe:  # the single env with model accuracy: the kernel through its table, as the lean step
            sim.step_one(rng, state, executed, obs, out)
            outcome = out
        else:
            outcome = sim.step(rng, state, executed, obs, observe=observe, out=out)
        extra = model.after_step(state, outcome, before)
        if model.routes_gating:
            sim.observe(state, None, obs)
        if model.observes:  # its keys of the observation (after the simulator's)
            model.observe(obs)
        if extra is not None:  # the model's extra columns, named by self.fields
            outcome = Outcome(np.concatenate([outcome.values, extra], axis=1), outcome.counts, outcome.server,
                              self.fields, outcome.detail)
        if compose:
            values = outcome.values
            values[:, self._reward_col] = compose_reward(*[values[:, i] for i in self._term_cols])
        return outcome

    def action_masks(self) -> np.ndarray:
        """(B, 2A) bool: sb3-contrib MultiBinary pairs [may be 0, may be 1] per action entry."""
        if self.state is None:
            raise RuntimeError("call reset() before action_masks()")
        may = self.sim.may_execute(self.state).reshape(self.num_envs, -1)
        masks = np.ones(may.shape + (2,), dtype=bool)
        masks[..., 1] = may
        return masks.reshape(self.num_envs, -1)

    # ---- info ------------------------------------------------------------------------------------
    def step_info(self, outcome) -> dict[str, np.ndarray]:
        """The single env's step info as (B,) arrays (int64 counters, float64 otherwise) of the outcome :meth:`step`
        returned: views of its columns, no copies (each step's outcome is a fresh array that nobody reads after its
        info is built; copying B x 31 numbers out of it cost about 1/20 of a step at B = 4096)."""
        values, counts = outcome.values, outcome.counts
        floats, ints = self._float_span, self._int_span
        # a run of columns: the transpose's rows are those views, made in C (a dict display of 30 views cost
        # about 8 us, a fifth of a B = 16 step)
        info = (dict(zip(self.float_keys, values.T[floats])) if floats is not None else
                {key: values[:, i] for key, i in zip(self.float_keys, self._float_cols)})
        info.update(zip(self.int_keys, counts.T[ints]) if ints is not None else
                    {key: counts[:, i] for key, i in zip(self.int_keys, self._int_cols)})
        return info

    def step_info_one(self, outcome, row: int = 0) -> dict:
        """One row's step info as Python numbers (the single env's)."""
        return self.step_result_one(outcome, row)[1]

    def step_result_one(self, outcome, row: int = 0) -> tuple[float, dict]:
        """One row's reward and step info as Python numbers (the single env's)."""
        return self._row_dict(outcome.values[row].tolist(), outcome.counts[row].tolist())

    def _row_function(self):
        """(values, counts) -> (reward, info) (``self._row_dict``): the reward and the info (float keys, then int
        keys) from one row's values and counts as Python lists, one dict display of the info keys
        (wide_env.envs.dict_display)."""
        items = [(key, f"v[{i}]") for key, i in zip(self.float_keys, self._float_cols)]
        items += [(key, f"c[{i}]") for key, i in zip(self.int_keys, self._int_cols)]
        return dict_function("v, c", items, prefix=f"v[{self._reward_col}], ")

    def reset_info(self) -> dict[str, np.ndarray]:
        """The reset info of every row at the current state, (B,) arrays (copies)."""
        return self.sim.reset_info(self.state)


def _span(columns: list[int]) -> slice | None:
    """``columns`` as a slice where they are a run of consecutive columns (None otherwise)."""
    if columns and columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return None


#: the reward rule on one row's Python numbers: its Python source (the same additions in the same order, IEEE double,
#: as the compiled rule's; no numba dispatch for four floats); the function itself where numba's JIT is disabled
_compose_one = getattr(compose_reward, "py_func", compose_reward)


class EpisodeBatchHandle:
    """The env front ends' public handle to the batched core they drive (``self._batch``)."""

    _batch: EpisodeBatch

    @property
    def episode_batch(self) -> EpisodeBatch:
        """The batched core this env drives (:class:`EpisodeBatch`): ``.sim`` (the phase's simulator,
        :class:`wide_env.sim.protocol.Simulator`), ``.state`` (the episodes' state, None before ``reset``), ``.obs``;
        for policies that need the simulator (the oracle, span statistics). Read it, do not step it: the env owns
        the episodes."""
        return self._batch
