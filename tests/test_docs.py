"""The project documents its own model: docs/model.md covers every config field, profile, environment id
and policy name, its links resolve, and no file refers to documents outside the repository."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess

import numpy as np
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


# ---- the README (issue 21, item 21): every registered id, observation key, reward term, info key, config field and
# --resume option appears in its tables, so a new key cannot ship undocumented ----------------------------------------

README = os.path.join(ROOT, "README.md")


@pytest.fixture(scope="module")
def readme() -> str:
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def _readme_section(doc: str, heading: str) -> str:
    """The text under a README heading (any level) up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", doc, re.M)
    assert m, f"README.md has no '{heading}' heading"
    level = len(m.group(1))
    end = re.search(rf"^#{{1,{level}}} ", doc[m.end():], re.M)
    return doc[m.end():] if end is None else doc[m.end():m.end() + end.start()]


def _first_cells(section: str) -> list[str]:
    """The first cell of every table row of a section (header and separator rows left out)."""
    cells = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    return [c for c in cells if c and not set(c) <= set("-: ")]


def _documented_fields(cells: list[str]) -> set[str]:
    """Config fields named in the first cells: `a.b`, `a.{b,c}`, and `a.b`, `c` (c inherits a's section)."""
    names = set()
    for cell in cells:
        section = ""
        for name in re.findall(r"`([^`]+)`", cell):
            m = re.fullmatch(r"([\w]+)\.\{([\w, ]+)\}", name)
            if m:
                section = m.group(1) + "."
                names |= {section + part.strip() for part in m.group(2).split(",")}
            elif "." in name:
                section = name.rsplit(".", 1)[0] + "."
                names.add(name)
            else:
                names.add(section + name)
    return names


def test_readme_lists_every_environment_id(readme):
    section = _readme_section(readme, "Environments")
    cells = " ".join(_first_cells(section))
    # a row may abbreviate a family after the first full id: `wide_env/WideMoE-Switch-v0`, `-Mixtral-v0`
    named = set(re.findall(r"`(wide_env/[\w-]+)`", cells))
    named |= {"wide_env/WideMoE" + short for short in re.findall(r"`(-[\w-]+)`", cells)}
    missing = sorted(set(ENVIRONMENTS) - named)
    assert not missing, f"README.md's environments table lacks the registered ids {missing}"


def test_readme_lists_every_observation_key(readme):
    from wide_env.sim.observation import observation_layout, prefill_observation_layout

    keys = set(observation_layout(8, 2, 8, model_state=True)) | set(prefill_observation_layout(4, 8, 2, 8))
    named = {c.strip("`") for c in _first_cells(_readme_section(readme, "Spaces (`WideMoE-v0`)"))}
    missing = sorted(keys - named)
    assert not missing, f"README.md's observation tables lack the keys {missing} (wide_env/sim/observation.py)"


def test_readme_lists_every_reward_term_and_info_key(readme):
    from wide_env.envs.decode import ACCURACY_KEYS, INFO_KEYS
    from wide_env.envs.prefill import INFO_KEYS as PREFILL_INFO_KEYS
    from wide_env.sim.decode import DecodeSimulator
    from wide_env.sim.prefill import PrefillSimulator

    section = _readme_section(readme, "Reward and info")
    terms = {k for k in INFO_KEYS if k.startswith("reward_")}
    named_terms = {c.strip("`") for c in _first_cells(section)}
    missing = sorted(terms - named_terms)
    assert not missing, f"README.md's reward table lacks the terms {missing}"
    keys = (set(INFO_KEYS) | set(ACCURACY_KEYS) | set(PREFILL_INFO_KEYS) | set(DecodeSimulator.RESET_INFO_KEYS)
            | set(PrefillSimulator.RESET_INFO_KEYS))
    named = set(re.findall(r"`(\w+)`", section))
    missing = sorted(keys - named)
    assert not missing, f"README.md's 'Reward and info' does not name the info keys {missing}"


def test_readme_config_table_lists_every_field(readme):
    fields = {name for name, _ in _config_fields(WideConfig.from_dict({}))}
    named = _documented_fields(_first_cells(_readme_section(readme, "Configuration")))
    missing = sorted(fields - named)
    assert not missing, f"README.md's configuration table lacks the fields {missing}"
    unknown = sorted(named - fields)
    assert not unknown, f"README.md's configuration table names fields that do not exist: {unknown}"


def test_readme_budget_mode_and_objective_name_every_choice(readme):
    rows = {c.split("|")[1].strip(): c for c in readme.splitlines() if c.startswith("| `budget.mode`")
            or c.startswith("| `reward.objective`")}
    for mode in ("layer", "token", "episode"):
        assert f'"{mode}"' in rows["`budget.mode`"], f"README.md's budget.mode row lacks {mode!r}"
    for objective in ("deviation", "accuracy"):
        assert f'"{objective}"' in rows["`reward.objective`"], f"README.md's reward.objective row lacks {objective!r}"


def test_readme_lists_every_resume_option(readme):
    from agents.run_config import RESUME_OVERRIDES

    section = _readme_section(readme, "Training agents")
    resume = section[section.index("`--resume RUN_DIR` continues"):]
    missing = [opt for opt in RESUME_OVERRIDES if not any(f"`{o}`" in resume for o in opt.split("/"))]
    assert not missing, f"README.md's --resume paragraph lacks the options it accepts: {missing}"


def test_train_help_states_each_default_once():
    from agents.run_config import build_parser

    text = " ".join(build_parser("train.py").format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default ppo)" in text and text.count("default ppo") == 1


def test_readme_timings_state_the_load_or_cpu_time(readme):
    """A measured time is either CPU time or says how loaded the machine was ('s of CPU', 'CPU-min', 'idle',
    'loaded'), since a loaded 2-core machine is about 2x slower than a quiet one."""
    offenders = []
    for para in re.split(r"\n\s*\n", readme):
        timed = re.search(r"\d+(\.\d+)? ?(s|min)\b", para)
        if timed and re.search(r"2-core|2 CPU cores|\btook\b|\bin all\b|\bwall\b|of training", para):
            if not re.search(r"CPU[- ](time|s|min)|s of CPU|idle|loaded|load average", para):
                offenders.append(para.strip()[:100])
    assert not offenders, "README.md gives times without the load or the CPU time:\n" + "\n".join(offenders)


# ---- docs/model.md agrees with the code (issue 21, item 22) --------------------------------------------------------

def _profile_table(doc: str) -> dict[str, list[str]]:
    """The profile table of docs/model.md: row label -> the cells of tiny, switch, mixtral, gpt-oss."""
    section = _section(doc, "profiles")
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| |"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5:
                rows[cells[0]] = cells[1:]
    assert rows, "docs/model.md: no profile table"
    return rows


def test_profile_table_matches_the_shipped_profiles(model_doc):
    import gymnasium as gym

    rows = _profile_table(model_doc)
    order = ["tiny", "switch-base-8", "mixtral-8x7b", "gpt-oss-20b"]
    ids = {"tiny": "wide_env/WideMoE-v0", "switch-base-8": "wide_env/WideMoE-Switch-v0",
           "mixtral-8x7b": "wide_env/WideMoE-Mixtral-v0", "gpt-oss-20b": "wide_env/WideMoE-GptOss-v0"}
    wrong = []
    for i, profile in enumerate(order):
        cfg = WideConfig.from_dict({"profile": profile})
        if not rows["gating source"][i].startswith(cfg.gating.source):
            wrong.append(f"{profile}: gating source {rows['gating source'][i]!r}, config has {cfg.gating.source!r}")
        env = gym.make(ids[profile])
        try:
            env.reset(seed=0)
            problem = env.unwrapped.problem
            for label, value in (("MoE layers L", problem.n_layers), ("experts E", problem.n_experts),
                                 ("top-K", problem.top_k)):
                if not rows[label][i].startswith(str(value)):
                    wrong.append(f"{profile}: {label} {rows[label][i]!r}, the env has {value}")
        finally:
            env.close()
        budgets = _trace_budgets(profile)
        cell = rows["eps_l per layer (trace)"][i]
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", cell)]
        if "-" in cell and "values" in cell:  # a range: lo-hi (n values)
            lo, hi = numbers[:2]
            ok = np.isclose(lo, budgets.min(), atol=0.006) and np.isclose(hi, budgets.max(), atol=0.006)
            ok = ok and f"({budgets.size} values)" in cell
        else:
            ok = len(numbers) == budgets.size and np.allclose(numbers, budgets, atol=0.0006)
        if not ok:
            wrong.append(f"{profile}: eps_l {cell!r}, the trace has {np.round(budgets, 3).tolist()}")
    assert not wrong, "docs/model.md's profile table disagrees with the shipped profiles:\n" + "\n".join(wrong)


def _trace_budgets(profile: str) -> np.ndarray:
    folder = os.path.join(ROOT, "wide_env", "data", "" if profile == "tiny" else profile)
    with np.load(os.path.join(folder, "moe_trace.npz"), allow_pickle=False) as z:
        return np.asarray(z["layer_budget"], dtype=float)


def test_simplifications_agree_with_the_model_sections(model_doc):
    simplifications = _section(model_doc, "simplifications")
    stale = [claim for claim in ("known exactly", "uncapped") if claim in simplifications]
    assert not stale, (f"docs/model.md 'Simplifications' says {stale}, but queueing delays are uncertain "
                       "(wide_env/sim/queues.py) and slot powers are capped at p_max (wide_env/sim/slots.py)")
    policies = _section(model_doc, "policies")
    assert '"Feasible" means `deadline_probability > 0`' in policies, (
        "docs/model.md: feasibility is deadline_probability > 0 in the code (baselines/policies.py)")


def test_model_doc_lists_every_info_key_and_reward_term(model_doc):
    from wide_env.envs.decode import ACCURACY_KEYS, INFO_KEYS
    from wide_env.envs.model_backend import LiveGating

    info = _section(model_doc, "decode-env")
    keys = set(INFO_KEYS) | set(ACCURACY_KEYS) | set(LiveGating.extra_keys)
    missing = sorted(k for k in keys if f"`{k}`" not in info)
    assert not missing, f"docs/model.md's decoding environment section does not name the info keys {missing}"
    formula = info[info.index('<a id="reward"></a>'):]
    formula = formula[:formula.index("```", formula.index("```") + 3)]
    terms = sorted(k for k in INFO_KEYS if k.startswith("reward_") and k not in formula)
    assert not terms, f"docs/model.md's reward formula lacks {terms}"


def test_readme_names_the_live_backend_info_keys(readme):
    from wide_env.envs.model_backend import LiveGating

    section = _readme_section(readme, "Reward and info")
    missing = [k for k in LiveGating.extra_keys if f"`{k}`" not in section]
    assert not missing, f"README.md's 'Reward and info' does not name the live backend's info keys {missing}"
