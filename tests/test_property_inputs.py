"""Property-based inputs (issue 21): configs (nested dicts over the config's fields with valid and invalid values),
actions (shapes, dtypes, NaN) and trace arrays are drawn at random, and every input either works or raises a
ConfigError, TraceError or ValueError whose message names the field (the flag, the array, the action).

The draws run on Hypothesis (``st.randoms``: shrinking, a fixed seed) where it is installed, and on seeded
``random.Random`` instances otherwise, so the property holds in every environment; either way a run stays well
under a minute."""

from __future__ import annotations

import math
import random
import re
from dataclasses import fields

import numpy as np
import pytest

import wide_env  # noqa: F401
from wide_env.config import ConfigError, WideConfig, _SECTIONS
from wide_env.gating import TraceError, validate_trace
from wide_env.gating.base import LAYER_BUDGET_RANGE, TOPK_WEIGHT_SLACK
from wide_env.gating.trace import OPTIONAL_KEYS, REQUIRED_KEYS
from trace_arrays import small_trace  # tests/ is on sys.path (pytest's rootdir insertion)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the seeded fallback below
    given = None


def property_test(n_examples: int):
    """Run ``test(rnd)`` on ``n_examples`` random sources: Hypothesis' when installed, else seeded ones."""
    def wrap(test):
        if given is not None:
            return settings(max_examples=n_examples, deadline=None, database=None, derandomize=True)(
                given(st.randoms(use_true_random=False))(test))

        def run():
            for seed in range(n_examples):
                try:
                    test(random.Random(seed))
                except AssertionError as exc:
                    raise AssertionError(f"seed {seed}: {exc}") from exc

        run.__name__ = test.__name__
        run.__doc__ = test.__doc__
        return run
    return wrap


def _named(message: str) -> list[str]:
    return re.findall(r"'([A-Za-z_][A-Za-z_0-9]*(?:\.[A-Za-z_][A-Za-z_0-9]*)*)(?:\[\d+\])?'", message)


# ---- configs ---------------------------------------------------------------------------------------------
_JUNK = ("bogus", "", None, [1, 2], {"a": 1}, True, np.bool_(False), "3", 3, -1.5)
_CHOICES = {  # valid values of the string fields (others come from _JUNK)
    "routing": ("softmax_topk_renorm", "softmax_topk_raw"), "source": ("synthetic", "trace"),
    "backend": ("table",), "accuracy": ("auto", "rule"), "hosts": ("one_to_one",), "fading": ("nakagami", "none"),
    "path_loss": (None, "power_law", "3gpp_umi"), "link_budget": ("paper", "3gpp"),
    "uplink_model": ("inversion", "fixed"), "energy_scope": ("uplink", "comm", "system"),
    "bit_allocation": ("dp", "uniform"), "mode": ("layer", "token", "episode"), "objective": ("deviation",),
    "trace_path": (None, "/nonexistent/trace.npz"), "checkpoint_dir": (None,),
}


def _number(rnd: random.Random, rng) -> object:
    """A value for a field with a declared range: inside it (as Python or numpy numbers), on its edges, or not."""
    kind = rnd.randrange(10)
    if kind < 5:  # inside
        low, high = rng.low, min(rng.high, 1e6)
        if low > 0 and high / low > 1e3:
            value = math.exp(rnd.uniform(math.log(low), math.log(high)))
        else:
            value = rnd.uniform(low, high)
        if rng.integer:
            value = int(min(max(round(value), rng.low), rng.high))
            value = min(value, 64)  # sizes: keep the draws cheap
        return rnd.choice((value, np.float64(value), np.int64(value) if rng.integer else np.float32(value)))
    if kind < 7:
        return rnd.choice((rng.low, rng.high))
    return rnd.choice((rng.low - 1.0 - abs(rng.low), rng.high * 2 + 1, float("nan"), float("inf"), -math.inf,
                       True, "1", None, [rng.low], np.float32("nan")))


def _field_value(rnd: random.Random, f) -> object:
    if "range" in f.metadata:
        return _number(rnd, f.metadata["range"])
    if "items_range" in f.metadata:
        return rnd.choice(([_number(rnd, f.metadata["items_range"]) for _ in range(rnd.randrange(0, 6))], "x", 3))
    if isinstance(f.default, bool):
        return rnd.choice((True, False, 0, "yes", None, np.bool_(True)))
    if f.name in _CHOICES and rnd.random() < 0.6:
        return rnd.choice(_CHOICES[f.name])
    return rnd.choice(_JUNK)


def _draw_config(rnd: random.Random) -> dict:
    config: dict = {}
    top = {f.name: f for f in fields(WideConfig)}
    for name in rnd.sample(sorted(top), rnd.randrange(0, 4)):
        f = top[name]
        if name in _SECTIONS:
            cls = _SECTIONS[name]
            if rnd.random() < 0.1:
                config[name] = rnd.choice(_JUNK)  # a section that is not a dict
                continue
            section_fields = fields(cls)
            chosen = rnd.sample(section_fields, min(len(section_fields), rnd.randrange(1, 4)))
            config[name] = {g.name: _field_value(rnd, g) for g in chosen}
            if rnd.random() < 0.1:
                config[name]["not_a_field"] = 1
        elif name == "profile":
            config[name] = rnd.choice(("tiny", "nope", 3, None))
        else:
            config[name] = _field_value(rnd, f)
    if rnd.random() < 0.05:
        config["colour"] = "red"
    return config


def _plain(value):
    """``value`` with every numpy number replaced by the Python number it stands for (bools stay)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _outcome(config: dict):
    try:
        return WideConfig.from_dict(config), None
    except (ConfigError, TraceError) as exc:
        return None, exc


@property_test(300)
def test_every_config_works_or_names_its_field(rnd):
    config = _draw_config(rnd)
    try:
        built, error = _outcome(config)
    except Exception as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"{config!r} raised {type(exc).__name__}: {exc}") from exc
    # numpy numbers are numbers: the same config in Python numbers has the same outcome
    plain_built, plain_error = _outcome(_plain(config))
    assert (built is None) == (plain_built is None) and built == plain_built, \
        f"{config!r}: {error} but in Python numbers: {plain_error}"
    if error is not None:
        names = _named(str(error))
        assert names, f"{config!r}: {error} names no field"
        # the field named belongs to what was given (a trace source's model fields come from the trace)
        assert names[0].split(".")[0] in set(config) | {"model"}, f"{config!r}: {error}"
        assert _named(str(plain_error))[0] == names[0]
        return
    again = WideConfig.from_dict(built.to_dict())  # what was accepted round-trips
    assert again == built
    from wide_env.envs.decode import WideMoEEnv

    try:  # and runs (the env's own checks of the config name the field too)
        env = WideMoEEnv(built)
        env.reset(seed=0)
        _, reward, _, _, _ = env.step(np.ones(env.action_space.n, np.int8))
    except ValueError as exc:
        assert _named(str(exc)), f"{config!r}: {exc} names no field"
        return
    assert np.isfinite(reward), config


# ---- actions ---------------------------------------------------------------------------------------------
_ACTION_ENVS = ("wide_env/WideMoE-Synthetic-v0", "wide_env/WideMoE-v0", "wide_env/WideMoEPrefill-v0")


@pytest.fixture(scope="module")
def envs():
    import gymnasium as gym

    made = {}
    for env_id in _ACTION_ENVS:
        env = gym.make(env_id)
        env.reset(seed=0)
        made[env_id] = env
    yield made
    for env in made.values():
        env.close()


def _draw_action(rnd: random.Random, n: int):
    shape = rnd.choice(((n,),) * 6 + ((n - 1,), (n + 1,), (), (1, n), (0,), (2, n)))
    dtype = rnd.choice((np.int8, np.int64, np.float32, np.float64, bool, np.uint8, np.float16, object, np.complex64))
    odd = rnd.random() < 0.5  # then some entries are not 0/1 (NaN, inf, 0.5, -1, 2)
    values = np.array([rnd.choice((0.5, -1, 2, float("nan"), float("inf"))) if odd and rnd.random() < 0.2
                       else rnd.choice((0, 1)) for _ in range(int(np.prod(shape)))]).reshape(shape)
    with np.errstate(invalid="ignore"):
        action = values.astype(dtype)
    return rnd.choice((action,) * 8 + (action.tolist(), None, "1" * n))


def test_every_action_works_or_names_the_action(envs):
    @property_test(150)
    def check(rnd):
        env_id = rnd.choice(_ACTION_ENVS)
        env = envs[env_id]
        env.reset(seed=rnd.randrange(1000))  # every example on its own episode
        n = env.action_space.n
        for _ in range(rnd.randrange(1, 4)):
            action = _draw_action(rnd, n)
            try:
                _, reward, terminated, truncated, _ = env.step(action)
            except ValueError as exc:  # the env is still usable after it (the next step continues)
                assert "action" in str(exc), f"{env_id} {action!r}: {exc}"
                continue
            except Exception as exc:  # pragma: no cover - the property's failure
                raise AssertionError(f"{env_id} {action!r} raised {type(exc).__name__}: {exc}") from exc
            assert np.isfinite(reward), f"{env_id} {action!r}: reward {reward}"
            if terminated or truncated:
                break

    check()


# ---- trace arrays ----------------------------------------------------------------------------------------
def _valid_trace(T=24, L=2, E=4, K=2, seed=0) -> dict:
    return small_trace(T, L, E, K, seed, doc_starts=(0, 10), full_correct=True)


#: a key's checks read these other keys too, so a change to it may be reported on them
_DEPENDENTS = {"gate_probs": set(REQUIRED_KEYS) | set(OPTIONAL_KEYS), "topk_idx": {"topk_weight"},
               "routing": {"topk_idx"}, "schema_version": set(), "mismatch": set()}
_SPECIAL = (float("nan"), float("inf"), -1.0, 6e4, 1e-30, 0.0, 1.5, -0.0, 300.0, 2.0 ** 40)


def _mutate(rnd: random.Random, arrays: dict) -> tuple[str, dict]:
    arrays = dict(arrays)
    key = rnd.choice(sorted(arrays) + ["not_a_key"])
    how = rnd.randrange(4)
    if key == "not_a_key":
        arrays[key] = np.zeros(3)
    elif how == 0:
        del arrays[key]
    elif how == 1:  # one entry set to a special value
        a = np.array(arrays[key])
        if a.size and a.dtype.kind in "fiub":
            flat = a.astype(np.float64).reshape(-1)
            flat[rnd.randrange(flat.size)] = rnd.choice(_SPECIAL)
            with np.errstate(invalid="ignore", over="ignore"):
                arrays[key] = flat.reshape(a.shape).astype(a.dtype) if a.dtype.kind == "f" else flat.reshape(a.shape)
        else:
            arrays[key] = np.array(rnd.choice(("x", 2, 1.5)))
    elif how == 2:  # another dtype
        dtype = rnd.choice((np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, bool, "<U5", np.complex64))
        a = np.array(arrays[key])
        with np.errstate(invalid="ignore", over="ignore"):
            arrays[key] = a.astype(dtype) if a.dtype.kind != "U" or dtype == "<U5" else np.zeros(a.shape, dtype)
    else:  # another shape
        a = np.array(arrays[key])
        shapes = [(), (0,), a.shape[:-1], a.shape + (1,), tuple(s + 1 for s in a.shape)]
        shape = rnd.choice([s for s in shapes if s != a.shape] or [(1,)])
        arrays[key] = np.resize(a, shape) if int(np.prod(shape)) else np.zeros(shape, a.dtype)
    return key, arrays


@property_test(800)
def test_every_trace_array_works_or_names_the_array(rnd):
    base = _valid_trace(seed=rnd.randrange(4))
    key, arrays = _mutate(rnd, base)
    try:
        validate_trace(arrays, source="drawn.npz")
    except TraceError as exc:
        names = set(_named(str(exc)))
        allowed = {key} | _DEPENDENTS.get(key, set())
        assert names & allowed, f"changed {key!r}: {exc}"
        assert str(exc).startswith("trace drawn.npz: ")
        return
    except Exception as exc:  # pragma: no cover - the property's failure
        raise AssertionError(f"changed {key!r} raised {type(exc).__name__}: {exc}") from exc
    assert key != "not_a_key"
    # what passes is what the schema describes: combine weights, budgets in the config's range, token ids
    low, high = LAYER_BUDGET_RANGE
    assert ((arrays["topk_weight"] >= 0) & (arrays["topk_weight"] <= 1 + TOPK_WEIGHT_SLACK)).all(), key
    budget = arrays["layer_budget"].astype(np.float64)
    assert ((budget >= low) & (budget <= high)).all(), key
    for ids in ("token_id", "target_id"):
        assert ids not in arrays or (arrays[ids] >= 0).all(), key
