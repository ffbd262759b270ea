"""The learned-agent plugin point (baselines/agent_plugin.py): baselines loads saved agents and trains them through
the ``wide_env.agents`` entry point that agents registers, and says how to install it when it is missing."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
from pathlib import Path

import gymnasium as gym
import pytest

import wide_env  # noqa: F401  (registers the ids)
from baselines import agent_plugin as plugin_point
from baselines.agent_plugin import (ENTRY_POINT_GROUP, AgentPlugin, AgentPluginUnavailable, agent_plugin,
                                    use_agent_plugin)
from baselines.policies import make_policy

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> metadata.EntryPoint:
    """The entry point pyproject.toml declares (what ``pip install -e .`` registers)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split(f'[project.entry-points."{ENTRY_POINT_GROUP}"]', 1)[1].split("\n[", 1)[0]
    name, value = (part.strip().strip('"') for part in
                   next(line for line in section.splitlines() if "=" in line and not line.startswith("#")).split("="))
    return metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def _entry_points(found):
    def fake(*, group):
        assert group == ENTRY_POINT_GROUP
        return list(found)
    return fake


@pytest.fixture(autouse=True)
def _no_injected_plugin():
    use_agent_plugin(None)
    yield
    use_agent_plugin(None)


def test_pyproject_declares_the_agents_plugin():
    ep = _declared()
    assert ep.value == "agents.plugin:PLUGIN"
    plugin = ep.load()
    assert isinstance(plugin, AgentPlugin)
    from agents.registry import ALGORITHMS

    assert plugin.algorithms == tuple(ALGORITHMS)  # one registry of algorithms


def test_plugin_is_found_through_the_entry_point(monkeypatch):
    monkeypatch.setattr(plugin_point, "entry_points", _entry_points([_declared()]))
    plugin = agent_plugin()
    assert plugin is importlib.import_module("agents.plugin").PLUGIN
    from agents.sb3_policy import SB3Policy

    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    policy = make_policy("ppo:missing.zip", env)
    assert type(policy) is SB3Policy and policy.algo == "ppo"  # loaded lazily: the file is read when it acts
    with pytest.raises(ValueError, match="unknown algorithm 'sac'"):
        make_policy("sac:model.zip", env)
    env.close()


def test_the_installed_environment_registers_the_plugin():
    found = [ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    assert found == ["agents.plugin:PLUGIN"], (
        f"entry points {found}: re-run pip install -e . (the editable install predates the entry point)")


def test_missing_plugin_names_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(plugin_point, "entry_points", _entry_points([]))
    with pytest.raises(AgentPluginUnavailable, match=r"pip install -e '\.\[train\]'"):
        agent_plugin()
    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    with pytest.raises(AgentPluginUnavailable, match="saved agents.*pip install -e"):
        make_policy("ppo:model.zip", env)
    # analytic policies need no plugin; an unknown name still says how saved agents are named
    assert make_policy("topk", env) is not None
    with pytest.raises(ValueError, match=r"unknown policy 'nope'.*algo:path\.zip.*pip install -e"):
        make_policy("nope", env)
    env.close()
    from baselines.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--policies", "ppo:model.zip", "--episodes", "1", "--budget-scales", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "pip install -e '.[train]'" in capsys.readouterr().err
    from baselines.benchmark import train_agent
    from baselines.benchmark_regimes import REGIMES

    with pytest.raises(AgentPluginUnavailable, match="benchmark.*pip install -e"):
        train_agent(REGIMES["token"], tmp_path, timesteps=8, cpu_minutes=1.0, quick=True)


def test_injected_plugin_replaces_the_entry_point(monkeypatch):
    monkeypatch.setattr(plugin_point, "entry_points", _entry_points([]))
    calls = []

    class Fake:
        algorithms = ("fake",)

        def load_policy(self, algo, path, problem, **kwargs):
            calls.append((algo, path))
            return lambda obs: None

        def train(self, argv):
            return Path("run")

    use_agent_plugin(Fake())
    env = gym.make("wide_env/WideMoE-v0", config={"n_tokens": 2})
    make_policy(" Fake : some/model.zip", env)
    assert calls == [("fake", "some/model.zip")]
    with pytest.raises(ValueError, match=r"algo in \['fake'\]"):
        make_policy("nope", env)
    env.close()
    with pytest.raises(TypeError, match="AgentPlugin"):
        use_agent_plugin(object())
