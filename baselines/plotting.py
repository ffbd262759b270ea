"""Shared figure helpers of the evaluation, training and benchmark plots (``tradeoff.png``, ``learning_curve.png``,
``fronts_*.png``): a panel grid of a readable aspect, panels that are constant by construction left out (and named
in a note instead), one shared legend below the panels, titles wrapped instead of cut, and distinct short names
for the printed tables."""

from __future__ import annotations

import math
import textwrap

import numpy as np

__all__ = ["pyplot", "is_constant", "split_constant", "panel_grid", "shared_legend", "wrap", "wrap_label",
           "short_names", "MAX_ASPECT", "ACCURACY_LABELS"]

#: axis labels of the accuracy_* columns
ACCURACY_LABELS = {"accuracy_correct": "next-byte accuracy (correct)", "accuracy_same": "same prediction as full model",
                   "accuracy_full": "full model's accuracy"}

#: the widest figure (width / height) the helpers produce: no panel strips
MAX_ASPECT = 2.2


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_constant(values, rtol: float = 1e-9) -> bool:
    """True when the finite values do not vary (or there are none): a panel of them shows a flat line."""
    v = np.asarray([x for x in np.asarray(values, dtype=np.float64).ravel() if np.isfinite(x)])
    if v.size == 0:
        return True
    return bool(np.ptp(v) <= rtol * max(1.0, float(np.max(np.abs(v)))) or np.ptp(v) == 0.0)


def split_constant(panels: list[tuple[str, str]], values_of) -> tuple[list[tuple[str, str]], list[str]]:
    """Panels (key, label) whose values (``values_of(key)``) vary, and a note "label = value" for each constant
    one (drawn as text, not as a flat panel). At least one panel is kept (the last) so a figure is never empty."""
    keep, notes = [], []
    for key, label in panels:
        vals = np.asarray(values_of(key), dtype=np.float64)
        if is_constant(vals):
            finite = vals[np.isfinite(vals)]
            notes.append(f"{label} = {finite[0]:.4g} throughout" if finite.size else f"{label}: no values")
        else:
            keep.append((key, label))
    if not keep and panels:
        keep = [panels[-1]]
        notes = notes[:-1]
    return keep, notes


def panel_grid(n: int, *, panel_w: float = 5.2, panel_h: float = 4.0, legend_rows: int = 1, note_rows: int = 0):
    """A figure with ``n`` panels, at most 2 per row (so a figure is never a strip). Returns (fig, axes, spare):
    ``spare`` is the unused grid cell where the shared legend goes (odd ``n`` > 1), else None and room is left
    below the panels for it."""
    plt = pyplot()
    ncols = 1 if n <= 1 else 2
    if n <= 1:
        panel_w = max(panel_w, 6.4)  # room for the legend and notes below a single panel
    nrows = max(1, math.ceil(n / ncols))
    spare_cell = ncols * nrows > n
    bottom_in = 0.0 if spare_cell else 0.45 + 0.22 * (legend_rows + note_rows)
    width = panel_w * ncols
    height = panel_h * nrows + bottom_in + 0.5
    if width / height > MAX_ASPECT:
        height = width / MAX_ASPECT
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.axis("off")
    fig.subplots_adjust(left=0.09 if ncols > 1 else 0.14, right=0.97, top=1 - 0.7 / height,
                        bottom=(bottom_in + 0.55) / height, hspace=0.38, wspace=0.3)
    return fig, flat[:n], (flat[n] if spare_cell else None)


def shared_legend(fig, axes, *, spare=None, notes: list[str] = (), ncol: int | None = None) -> None:
    """One legend for every panel (the union of their labelled artists, first occurrence kept) in the spare grid
    cell, or below the panels, then the notes (e.g. the constant quantities left out)."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    labels = [wrap_label(lab) for lab in labels]
    if spare is not None:
        if handles:
            spare.legend(handles, labels, loc="upper center", fontsize=8, frameon=False,
                         ncol=1 if len(labels) <= 8 else 2)
        text = "\n".join(textwrap.fill(note, 60) for note in notes)
        spare.text(0.5, 0.02, text, ha="center", va="bottom", fontsize=7.5, color="0.3", transform=spare.transAxes)
        return
    chars = int(fig.get_figwidth() * 14)  # characters of 7.5 pt text across the figure
    lines = [w for note in notes for w in textwrap.wrap(note, chars)]
    line_h = 7.5 * 1.3 / 72 / fig.get_figheight()  # one line of note text, in figure fractions
    if lines:
        fig.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=7.5, color="0.3", linespacing=1.3)
    if handles:
        ncol = ncol or min(len(labels), 3 if max(len(lab) for lab in labels) > 24 else 4)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.015 + line_h * len(lines)))


def wrap_label(label: str, width: int = 40) -> str:
    """A long legend label (a model path) on several lines, broken after "/" where possible, never cut."""
    if len(label) <= width:
        return label
    lines, line = [], ""
    for part in label.replace("/", "/\0").split("\0"):
        while len(part) > width:  # a piece without "/" longer than a line
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return "\n".join(x for x in lines if x)


def wrap(title: str, width: int = 80) -> str:
    """A title on as many lines as it needs (never cut at the figure's edge)."""
    return "\n".join(textwrap.wrap(title, width)) if title else ""


def short_names(names, width: int = 24) -> dict[str, str]:
    """Distinct names of at most ``width`` characters for a printed table: a name that fits is kept; a longer
    one keeps its kind (``ppo:``) and its end (the file), the middle elided with "..."; names that would still
    collide keep more of their end, then get a ``#i`` suffix. The CSV and the plots keep the full names."""
    names = list(dict.fromkeys(names))

    def cut(name: str, w: int) -> str:
        if len(name) <= w:
            return name
        head = name.split(":", 1)[0] + ":" if ":" in name[: w // 2] else ""
        return head + "..." + name[-max(w - len(head) - 3, 1):]

    out = {n: cut(n, width) for n in names}
    groups: dict[str, list[str]] = {}
    for n, s in out.items():
        groups.setdefault(s, []).append(n)
    for members in groups.values():
        if len(members) > 1:
            for i, n in enumerate(members, 1):
                suffix = f"#{i}"
                out[n] = cut(n, width - len(suffix)) + suffix
    return out
