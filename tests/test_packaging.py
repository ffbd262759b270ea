"""Packaging and first contact (issue 11, items 11, 12, 14, 15): console scripts and ``python -m agents``,
matplotlib as a base dependency, an SPDX license, the README's order, and a clear warning when another
distribution's ``baselines`` or ``agents`` shadows ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _run(args, cwd, env=None, timeout=120):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_console_scripts_point_at_the_entry_functions():
    import importlib

    project = _pyproject()["project"]
    scripts = project["scripts"]
    assert set(scripts) == {"wide-train", "wide-evaluate"}
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    assert any(d.split(">")[0].split("=")[0].strip() == "matplotlib" for d in project["dependencies"])
    assert project["license"] == "MIT"  # an SPDX expression, not the deprecated table


def test_python_m_agents_and_agents_run_print_the_training_help(tmp_path):
    env = {"PYTHONPATH": str(ROOT)}
    for module, prog in (("agents", "python -m agents"), ("agents.run", "python -m agents")):
        res = _run([sys.executable, "-m", module, "--help"], tmp_path, env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f"usage: {prog}") and "--resume" in res.stdout


def _build_wheel(tmp_path) -> Path:
    """A wheel of the repository's packages, built from a copy (the build writes into its source folder)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("wide_env", "agents", "baselines"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                str(tmp_path / "dist"), str(src)], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def test_wheel_holds_the_entry_points_and_the_package_data(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "wide-train = agents.run:main" in entry and "wide-evaluate = baselines.evaluate:cli" in entry
    for needed in ("agents/__main__.py", "agents/hyperparams/ppo.yml", "wide_env/data/moe_trace.npz",
                   "baselines/evaluate.py"):
        assert needed in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in meta and "Requires-Dist: matplotlib" in meta


@pytest.mark.slow
def test_non_editable_install_trains_and_evaluates_without_the_repository(tmp_path):
    """The wheel installed into a fresh venv (dependencies borrowed from this interpreter's site packages):
    wide-train, python -m agents and wide-evaluate work from a folder without train.py."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)], tmp_path, timeout=300).returncode == 0
    py = venv / "bin" / "python"
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # the deps, not their .pth hooks
    res = _run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    work = tmp_path / "work"
    work.mkdir()
    clean = {"PYTHONPATH": ""}
    res = _run([str(py), "-c", "import wide_env, agents, baselines; print(wide_env.__file__, agents.__file__)"], work,
               clean)
    assert res.returncode == 0 and str(site) in res.stdout and str(ROOT) not in res.stdout, res.stdout + res.stderr
    res = _run([str(venv / "bin" / "wide-train"), "--help"], work, clean)
    assert res.returncode == 0 and res.stdout.startswith("usage: wide-train"), res.stderr[-2000:]
    res = _run([str(py), "-m", "agents", "-n", "128", "--n-envs", "2", "--eval-freq", "0", "--eval-episodes", "1",
                "--env-kwargs", "{'config': {'n_tokens': 2}}", "--no-compare", "-tb", "none", "-v", "0"], work, clean,
               timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "run folder:" in res.stdout and (work / "runs" / "ppo").is_dir()
    res = _run([str(venv / "bin" / "wide-evaluate"), "--episodes", "1", "--budget-scales", "1", "--out", "ev"], work,
               clean, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (work / "ev" / "tradeoff.png").exists()


def test_import_wide_env_warns_when_another_baselines_shadows_ours(tmp_path):
    fake = tmp_path / "shadow" / "baselines"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("# OpenAI Baselines' top-level package\n")
    code = "import warnings; warnings.simplefilter('always'); import wide_env"
    res = _run([sys.executable, "-c", code], tmp_path, {"PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT)])})
    assert res.returncode == 0, res.stderr
    assert f"'import baselines' resolves to {fake}" in res.stderr and "OpenAI Baselines" in res.stderr
    assert "'import agents'" not in res.stderr  # ours still resolves
    res = _run([sys.executable, "-c", code], tmp_path, {"PYTHONPATH": str(ROOT)})
    assert "resolves to" not in res.stderr


def test_readme_gives_cpu_torch_advice_before_the_commands_and_names_the_package_clash():
    text = (ROOT / "README.md").read_text()
    setup = text[text.index("## Set-up"):text.index("## Quick start")]
    assert setup.index("CPU build") < setup.index('pip install -e ".[train]"')
    assert "OpenAI Baselines" in text and "wide-train" in text and "wide-evaluate" in text
