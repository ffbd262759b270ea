"""The project documents its own model: docs/model.md covers every config field, profile, environment id
and policy name, its links resolve, and no file refers to documents outside the repository."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess

import pytest

from wide_env import ENVIRONMENTS, PROFILES, WideConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DOC = os.path.join(ROOT, "docs", "model.md")

# References to the developers' background outside the repository, which users do not have. Built from
# pieces so that this file does not match itself.
FORBIDDEN = ("../" + "shared", "wide" + "-model", "spec" + " section")

_SKIP_DIRS = {"__pycache__", "runs", "logs", "build", "dist"}


def _tracked_files() -> list[str]:
    """Repository-relative paths of the tracked files (git), or of the source tree outside git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [p for p in out.decode().split("\0") if p]
        if paths:
            return paths
    except (OSError, subprocess.CalledProcessError):
        pass
    paths = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames
                       if not d.startswith(".") and d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        paths += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return paths


def _text_files() -> dict[str, str]:
    """Tracked text files (binary files, those with a NUL byte, are left out), outside ``.ci/``."""
    texts = {}
    for rel in _tracked_files():
        if rel.replace(os.sep, "/").startswith(".ci/"):
            continue
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue  # deleted in the work tree
        with open(path, "rb") as fh:
            data = fh.read()
        if b"\0" in data[:8192]:
            continue
        texts[rel] = data.decode("utf-8", errors="replace")
    return texts


@pytest.fixture(scope="module")
def model_doc() -> str:
    with open(MODEL_DOC, encoding="utf-8") as fh:
        return fh.read()


def _config_fields(obj, prefix: str = ""):
    """(dotted name, value) of every leaf field of a config, walking the nested dataclasses."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _config_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def _section(doc: str, anchor: str) -> str:
    """The text of the level-2 section that follows ``<a id="anchor">``, up to the next level-2 heading."""
    start = doc.index(f'<a id="{anchor}"></a>')
    heading = doc.index("\n## ", start)
    end = doc.find("\n## ", heading + 1)
    return doc[heading:] if end < 0 else doc[heading:end]


def _reference_rows(doc: str) -> list[tuple[str, str]]:
    """(field, default cell) of every row of the configuration reference tables."""
    rows = re.findall(r"^\| `([A-Za-z_][\w.]*)` \| `([^`]*)` \|", _section(doc, "config-reference"), re.M)
    assert rows, "docs/model.md: the configuration reference has no '| `field` | `default` |' rows"
    return rows


def test_no_file_refers_outside_the_repository():
    offenders = [f"{rel}:{n}: {line.strip()}"
                 for rel, text in _text_files().items()
                 for n, line in enumerate(text.splitlines(), 1)
                 if any(bad in line.lower() for bad in FORBIDDEN)]
    assert not offenders, ("these lines refer to documents outside the repository; link the section of "
                           "docs/model.md instead (with a section anchor):\n" + "\n".join(offenders))


def test_every_config_field_is_documented_with_its_default(model_doc):
    defaults = dict(_config_fields(WideConfig.from_dict({})))
    rows = _reference_rows(model_doc)
    names = [name for name, _ in rows]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"docs/model.md documents these config fields twice: {duplicates}"
    missing = sorted(set(defaults) - set(names))
    assert not missing, (f"config fields without a row in docs/model.md's configuration reference: {missing}; "
                         "add '| `field` | `default` | unit | tag | meaning |' rows")
    unknown = sorted(set(names) - set(defaults))
    assert not unknown, f"docs/model.md documents config fields that do not exist: {unknown}"
    wrong = [f"{name}: documented {cell}, WideConfig.from_dict({{}}) has {defaults[name]!r}"
             for name, cell in rows if ast.literal_eval(cell) != defaults[name]]
    assert not wrong, "docs/model.md's configuration reference has stale defaults:\n" + "\n".join(wrong)


def test_profiles_environments_and_policies_are_documented(model_doc):
    from baselines.policies import POLICY_NAMES

    profiles = _section(model_doc, "profiles")
    missing = [f"profile {p}" for p in PROFILES if f"`{p}`" not in profiles]
    missing += [f"environment {env_id}" for env_id in ENVIRONMENTS if f"`{env_id}`" not in profiles]
    policies = _section(model_doc, "policies")
    missing += [f"policy {name}" for name in POLICY_NAMES if f"(`{name}`" not in policies]
    assert not missing, f"docs/model.md does not document: {missing}"


def test_model_doc_links_resolve(model_doc):
    anchors = re.findall(r'<a id="([^"]+)"></a>', model_doc)
    assert len(anchors) == len(set(anchors)), "docs/model.md defines an anchor twice"
    broken = [f"docs/model.md: (#{a})" for a in re.findall(r"\]\(#([^)]+)\)", model_doc) if a not in anchors]
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", model_doc):
        if "://" not in target and not os.path.exists(os.path.join(ROOT, "docs", target)):
            broken.append(f"docs/model.md: ({target})")
    for rel, text in _text_files().items():
        broken += [f"{rel}: docs/model.md#{a}" for a in re.findall(r"docs/model\.md#([\w-]+)", text)
                   if a not in anchors]
    assert not broken, "links to missing anchors or files:\n" + "\n".join(broken)
