"""Issue 21, items 6, 23 and 24: the printed tables and the plots, drawn from small synthetic data.

Every figure: a readable aspect (no strip), no panel constant by construction (e.g. ``accuracy_full``, flat-zero
violation rates), 95% CI error bars on the means, one legend for all panels that covers no data, titles not cut.
The tables: distinct names for policies whose names are cut, a legend of the accuracy and ``t (us)`` columns."""

from __future__ import annotations

import matplotlib
import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import PathCollection, PolyCollection
from matplotlib.container import ErrorbarContainer

from baselines.plotting import MAX_ASPECT, short_names
from baselines.results import ci95, format_table, plot_tradeoff

PPO_A = "ppo:runs/ppo/wide_env-WideMoE-v0_1/best_model.zip"
PPO_B = "ppo:runs/ppo/wide_env-WideMoE-v0_2/best_model.zip"


@pytest.fixture
def figures(monkeypatch):
    """The figures saved during a test (captured at savefig, before the plotting code closes them)."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def _summary_rows(policies=("topk", "siftmoe", "wdmoe"), scales=(0.5, 1.0, 2.0)) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i, pol in enumerate(policies):
        for s in scales:
            energy = rng.uniform(0.5, 1.0, 8) * 1e-8 * (1 - 0.1 * i * s)
            acc = np.clip(0.45 - 0.01 * i * s + 0.05 * rng.standard_normal(8), 0, 1)
            rows.append({"env": "wide_env/WideMoE-v0", "policy": pol, "budget_scale": s, "episodes": 8,
                         "energy_per_token_j": float(energy.mean()), "energy_per_token_ci95": ci95(energy),
                         "energy_rel_topk": 1 - 0.1 * i * s, "deviation": 0.1 * i * s, "deviation_ci95": 0.02,
                         "violation_rate": 0.0, "deadline_misses_per_token": 0.0, "executed_per_step": 2 - 0.2 * i,
                         "reward_per_step": -1.0, "decision_time_us": 10.0 + i,
                         "accuracy_correct": float(acc.mean()), "accuracy_correct_ci95": ci95(acc),
                         "accuracy_full": 0.4688, "accuracy_full_ci95": 0.2,
                         "accuracy_same": 1 - 0.05 * i * s, "accuracy_same_ci95": 0.03})
    return rows


def _data_axes(fig):
    """The panels that draw data (a legend-only or spare cell is switched off)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_visible()]


def _png_aspect(path) -> float:
    h, w = matplotlib.image.imread(str(path)).shape[:2]
    return w / h


def _renderer(fig):
    """A drawn Agg canvas for a figure that pyplot has already closed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _check_panels(fig, *, error_bars=True):
    axes = _data_axes(fig)
    assert axes, "the figure draws no panel"
    for ax in axes:
        # the data lines (an error bar's caps are lines with the markers "_" and "|")
        values = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines
                                 if line.get_marker() not in ("_", "|")] or [np.array([])])
        values = values[np.isfinite(values)]
        assert values.size and np.ptp(values) > 0, f"panel {ax.get_ylabel()!r} is constant"
        assert not any(k in ax.get_ylabel() for k in ("accuracy full", "full model's accuracy")), (
            f"panel {ax.get_ylabel()!r} is constant by construction")
        assert ax.get_legend() is None, f"panel {ax.get_ylabel()!r} has its own legend (one shared legend expected)"
        if error_bars:
            bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
            bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
            assert bars or bands, f"panel {ax.get_ylabel()!r} has no confidence intervals"
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1, f"expected one shared legend, found {len(legends)}"
    renderer = _renderer(fig)
    legend_box = legends[0].get_window_extent(renderer)
    for ax in axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"
    assert legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width and legend_box.y0 >= 0, "the legend is cut"
    for text in [fig._suptitle] + [ax.title for ax in axes]:
        if text is not None and text.get_text():
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= fig.bbox.width, f"title cut at the figure's edge: {text.get_text()!r}"
    for handle in legends[0].legend_handles:
        alpha = handle.get_alpha()
        assert alpha is None or alpha > 0.2, f"invisible legend entry {handle}"


# ---- item 6 and 24: the printed table ----------------------------------------------------------------------------

def test_cut_policy_names_stay_distinct_and_are_listed_in_full():
    rows = _summary_rows(policies=(PPO_A, PPO_B, "topk"), scales=(1.0,))
    table = format_table(rows)
    body = table.splitlines()[2:5]
    names = [line[:24].strip() for line in body]
    assert len(set(names)) == 3, f"the table prints the same name twice: {names}"
    assert all(len(n) <= 24 for n in names)
    for full in (PPO_A, PPO_B):
        assert f"= {full}" in table, f"the table does not say which model {full} is"


def test_short_names_are_unique_even_when_the_ends_agree():
    names = ["ppo:a/very/long/path/number/one/model.zip", "ppo:b/very/long/path/number/one/model.zip", "topk"]
    short = short_names(names)
    assert len(set(short.values())) == 3
    assert short["topk"] == "topk"
    assert all(len(s) <= 24 for s in short.values())


def test_table_has_a_legend_of_its_columns():
    table = format_table(_summary_rows())
    for column in ("correct =", "full =", "same =", "t (us) =", "E/E_topk =", "miss/tok ="):
        assert column in table, f"the table's legend does not explain {column[:-2]!r}"


# ---- item 23: the figures -----------------------------------------------------------------------------------------

def test_tradeoff_plot_is_readable(tmp_path, figures):
    path = tmp_path / "tradeoff.png"
    plot_tradeoff(_summary_rows(), path)
    aspect = _png_aspect(path)
    assert 0.6 <= aspect <= MAX_ASPECT + 0.05, f"tradeoff.png has aspect {aspect:.2f} (a strip)"
    (fig,) = figures
    _check_panels(fig)
    labels = [ax.get_ylabel() for ax in _data_axes(fig)]
    assert len(labels) == 3, labels  # correct, same, deviation; full is constant by construction
    assert any("full model's accuracy = 0.4688" in t.get_text() for ax in fig.axes for t in ax.texts + fig.texts)


def test_tradeoff_plot_keeps_long_names_whole(tmp_path, figures):
    long_c = "ppo:/tmp/some/deeper/folder/runs/ppo/wide_env-WideMoE-v0_1/final_model.zip"
    plot_tradeoff(_summary_rows(policies=(PPO_A, PPO_B, long_c, "topk")), tmp_path / "tradeoff.png")
    (fig,) = figures
    _check_panels(fig)
    legend = next(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)
    texts = [t.get_text().replace("\n", "") for t in legend.get_texts()]
    assert texts == [PPO_A, PPO_B, long_c, "topk"], "the plot must keep the full names"


def test_tradeoff_plot_with_one_panel(tmp_path, figures):
    rows = [{k: v for k, v in r.items() if not k.startswith("accuracy_")} for r in _summary_rows()]
    plot_tradeoff(rows, tmp_path / "tradeoff.png")
    assert _png_aspect(tmp_path / "tradeoff.png") <= MAX_ASPECT + 0.05
    _check_panels(figures[0])


def _eval_rows() -> list[dict]:
    return [{"timesteps": t, "energy_per_token_j": 1e-8 * (1 - 0.03 * i), "energy_per_token_ci95": 2e-9,
             "violation_rate": 0.0, "deadline_misses_per_token": 0.0, "deviation": 0.1 * i,
             "accuracy_correct": 0.44 + 0.002 * i, "accuracy_correct_ci95": 0.1, "accuracy_full": 0.4375,
             "accuracy_same": 1 - 0.01 * i, "accuracy_same_ci95": 0.02}
            for i, t in enumerate(range(0, 12288, 2048))]


def _reference_rows() -> list[dict]:
    return [{"policy": "siftmoe", "energy_per_token_j": 7e-9, "energy_per_token_ci95": 2e-9, "violation_rate": 0.0,
             "deadline_misses_per_token": 0.0, "accuracy_correct": 0.45, "accuracy_correct_ci95": 0.1,
             "accuracy_full": 0.4375, "accuracy_same": 0.96, "accuracy_same_ci95": 0.05},
            {"policy": "topk", "energy_per_token_j": 9e-9, "energy_per_token_ci95": 2e-9, "violation_rate": 0.0,
             "deadline_misses_per_token": 0.0, "accuracy_correct": 0.4375, "accuracy_correct_ci95": 0.1,
             "accuracy_full": 0.4375, "accuracy_same": 1.0, "accuracy_same_ci95": 0.0}]


def test_learning_curve_has_no_flat_panels_and_one_legend(tmp_path, figures):
    from agents.evaluation import plot_learning_curve

    path = tmp_path / "learning_curve.png"
    plot_learning_curve(_eval_rows(), _reference_rows(), path, title="ppo on wide_env/WideMoE-v0 (expert_set, seed 0)")
    aspect = _png_aspect(path)
    assert 0.6 <= aspect <= MAX_ASPECT + 0.05, f"learning_curve.png has aspect {aspect:.2f}"
    (fig,) = figures
    _check_panels(fig)
    labels = [ax.get_ylabel() for ax in _data_axes(fig)]
    assert not any("violation" in lab or "misses" in lab for lab in labels), f"flat-zero panels drawn: {labels}"
    notes = " ".join(t.get_text() for ax in fig.axes for t in ax.texts) + " ".join(t.get_text() for t in fig.texts)
    assert "deadline misses per token = 0" in notes and "full model's accuracy = 0.4375" in notes


def _regime_episode_rows(regime, n=10, scales=(0.125, 0.5, 1.0, 4.0, 16.0)) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []

    def add(policy, scale, energy, accuracy):
        for seed in range(n):
            rows.append({"policy": policy, "budget_scale": scale, "seed": seed, "tokens": 16, "steps": 64,
                         "energy_j": 16 * energy * (1 + 0.1 * rng.standard_normal()), "topk_energy_j": 16e-8,
                         "accuracy_correct": float(np.clip(accuracy + 0.05 * rng.standard_normal(), 0, 1)),
                         "budget_violated": 0, "deadline_misses": 0})

    for policy, e, a in (("topk", 1e-8, 0.45), ("topk_ideal", 1e-8, 0.45), ("ppo", 1e-8, 0.45),
                         ("oracle", 0.5e-8, 0.42)):
        add(policy, 1.0, e, a)
    for i, b in enumerate(regime.baselines):
        for s in scales:
            add(b.label, s, 1e-8 * (0.35 + 0.05 * i + 0.5 * (1 - np.exp(-1 / s))),
                0.35 + 0.005 * i + 0.06 * (1 - np.exp(-1 / s)))  # below Top-K's 0.45: it ends every front
    return rows


def test_fronts_plot_is_readable(tmp_path, figures):
    from matplotlib.lines import Line2D

    from baselines.benchmark_regimes import REGIMES
    from baselines.benchmark_scoring import baseline_curve, plot_regime_fronts

    regime = REGIMES["queues"]  # the longest title
    rows = _regime_episode_rows(regime)
    path = tmp_path / "fronts_queues.png"
    plot_regime_fronts(regime, rows, regime.baselines[1].label, path)
    aspect = _png_aspect(path)
    assert 0.6 <= aspect <= MAX_ASPECT + 0.05
    (fig,) = figures
    (ax,) = _data_axes(fig)
    _check_panels(fig)
    renderer = _renderer(fig)
    # scale labels do not overlap one another
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "overlapping scale labels"
    # PPO (here exactly at Top-K's point) is drawn above Top-K's marker
    marks = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_offsets().shape == (1, 2)]
    ppo = next(c for c in marks if len(c.get_facecolor()) == 1
               and np.allclose(c.get_facecolor()[0, :3], [0.839, 0.153, 0.157], atol=0.01))  # tab:red
    assert all(ppo.get_zorder() > c.get_zorder() for c in marks if c is not ppo), "PPO's marker is hidden under another"
    # every baseline's front runs to practical Top-K (its most accurate, mixable point)
    topk = baseline_curve(rows, regime.baselines[0].label)
    topk_point = (topk["energy"][0].mean(), topk["accuracy"][0].mean())
    fronts = [line for line in ax.lines if isinstance(line, Line2D) and line.get_linestyle() not in ("None", "")
              and len(line.get_xdata()) > 1]
    assert len(fronts) >= len(regime.baselines)
    for line in fronts[:len(regime.baselines)]:
        assert np.isclose(line.get_xdata()[-1], topk_point[0]) and np.isclose(line.get_ydata()[-1], topk_point[1])
