"""One direction (issue 20): the import contracts of pyproject.toml's [tool.importlinter], run with import-linter.

* ``layers``: agents above baselines above wide_env (wide_env imports neither; baselines does not import agents;
  saved agents reach baselines through the plugin of baselines/agent_plugin.py).
* ``acyclic``: no import circle between the modules (or subpackages) of any package, at any depth; imports
  inside functions count.

A broken contract fails with import-linter's report: the importing module, the imported one and the line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wide_env", "baselines", "agents")


def _contracts() -> dict[str, dict]:
    from importlinter.api import read_configuration

    config = read_configuration(str(ROOT / "pyproject.toml"))
    return {c["id"]: c for c in config["contracts_options"]}


def _lint(contract_id: str) -> subprocess.CompletedProcess:
    # a fresh interpreter in the repository root: the graph is built from this checkout's sources (import-linter
    # puts the working directory first on sys.path), not from whatever the environment installed
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(limit_to_contracts=({contract_id!r},), no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_contracts_cover_every_package():
    contracts = _contracts()
    assert contracts["layers"]["type"] == "layers"
    assert contracts["layers"]["layers"] == ["agents", "baselines", "wide_env"]
    assert contracts["acyclic"]["type"] == "acyclic_siblings"
    assert sorted(contracts["acyclic"]["ancestors"]) == sorted(PACKAGES)
    for contract in contracts.values():  # no exception list that would let an import through
        assert not contract.get("ignore_imports") and not contract.get("skip_descendants"), contract["id"]


def _circles() -> str:
    """Each circle import-linter would break, as the import that closes it and the chain back (module, line)."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    lines = []
    for package in sorted(m for m in graph.modules if graph.find_children(m)):
        def child(module: str) -> str:  # the sibling under ``package`` that holds ``module``
            return f"{package}.{module[len(package) + 1:].split('.')[0]}"

        for importer, imported in sorted(graph.nominate_cycle_breakers(package)):
            back = graph.find_shortest_chain(child(imported), child(importer), as_packages=True) or ()
            where = ", ".join(f"l.{d['line_number']}" for d in graph.get_import_details(importer=importer,
                                                                                       imported=imported))
            lines.append(f"{package}: {importer} -> {imported} ({where}); back: {' -> '.join(back)}")
    return "\n".join(lines)


@pytest.mark.parametrize("contract_id", ["layers", "acyclic"])
def test_import_contract_is_kept(contract_id):
    res = _lint(contract_id)
    if res.returncode != 0 and contract_id == "acyclic":
        pytest.fail(f"import circles:\n{_circles()}\n\nimport-linter:\n{res.stdout}\n{res.stderr}")
    assert res.returncode == 0, f"import contract {contract_id!r} broken:\n{res.stdout}\n{res.stderr}"
    assert "1 kept, 0 broken" in res.stdout, res.stdout
