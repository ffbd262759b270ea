"""The plugin point for learned agents: baselines defines what it needs, the ``agents`` package provides it.

Loading a saved agent (``ALGO:PATH`` in :func:`baselines.policies.make_policy`) and training one (the regimes
benchmark) belong to ``agents``, a layer above ``baselines``; baselines does not import it. The implementation is
found through the package entry-point group :data:`ENTRY_POINT_GROUP` (``agents.plugin:PLUGIN`` in
pyproject.toml, registered by ``pip install -e .``), or set in process with :func:`use_agent_plugin`.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["ENTRY_POINT_GROUP", "INSTALL_HINT", "AgentPlugin", "AgentPluginUnavailable", "agent_plugin",
           "use_agent_plugin"]

ENTRY_POINT_GROUP = "wide_env.agents"
INSTALL_HINT = "pip install -e '.[train]'"


@runtime_checkable
class AgentPlugin(Protocol):
    """What baselines asks of the learned-agent package."""

    #: the ALGO names accepted in ``ALGO:PATH``
    algorithms: tuple[str, ...]

    def load_policy(self, algo: str, path: str, problem: Any, **kwargs: Any) -> Any:
        """A ``policy(obs) -> action`` callable (with ``reset(seed)``) for the model ``algo`` saved at ``path``;
        ValueError for an unknown ``algo``."""

    def train(self, argv: list[str]) -> Path:
        """``python train.py ARGV`` in this process; returns the run folder."""


class AgentPluginUnavailable(ImportError):
    """No learned-agent package is installed; the message says how to install it."""


_injected: AgentPlugin | None = None


def use_agent_plugin(plugin: AgentPlugin | None) -> None:
    """Use ``plugin`` instead of the entry point (embedding, tests); None returns to the entry point."""
    global _injected
    if plugin is not None and not isinstance(plugin, AgentPlugin):
        raise TypeError(f"{plugin!r} lacks the AgentPlugin members (algorithms, load_policy, train)")
    _injected = plugin


def agent_plugin(purpose: str = "saved agents ('ppo:PATH')") -> AgentPlugin:
    """The installed learned-agent plugin; :class:`AgentPluginUnavailable` naming ``purpose`` and the fix when
    there is none."""
    if _injected is not None:
        return _injected
    found = list(entry_points(group=ENTRY_POINT_GROUP))
    if not found:
        raise AgentPluginUnavailable(
            f"{purpose}: no learned-agent package is installed (none registers the entry point group "
            f"{ENTRY_POINT_GROUP!r}); run {INSTALL_HINT} from the repository root (an editable install made "
            "before the entry point existed needs re-running too)")
    if len(found) > 1:
        raise AgentPluginUnavailable(f"several {ENTRY_POINT_GROUP!r} plugins are installed "
                                     f"({', '.join(sorted(ep.value for ep in found))}); uninstall all but one")
    plugin = found[0].load()
    if not isinstance(plugin, AgentPlugin):
        raise AgentPluginUnavailable(f"the {ENTRY_POINT_GROUP!r} entry point {found[0].value} is not an AgentPlugin "
                                     "(algorithms, load_policy, train)")
    return plugin
