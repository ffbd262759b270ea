"""Rendering of `WideMoE-v0`: a per-step text table (ansi) and a picture (rgb_array, matplotlib, lazy)."""

from __future__ import annotations

import numpy as np


def render_text(env) -> str:
    """One line per expert of the last decided layer (or the upcoming one before any step)."""
    sim = env.sim
    last = env._last
    view = last["view"] if last else env.current_view()
    executed = last["executed"] if last else [0] * sim.n_experts
    topk = set(view.topk_idx.tolist())
    lines = [f"token {int(view.token)} layer {int(view.layer)}" + ("" if last else " (before acting)"),
             f"{'expert':>6} {'node':>4} {'gate':>6} {'topK':>4} {'energy_J':>10} {'T/Tmax':>7} {'run':>3}"]
    for e in range(sim.n_experts):
        lines.append(f"{e:>6} {int(sim.hosts[view.layer, e]):>4} {view.probs[e]:6.3f} {'*' if e in topk else '':>4} "
                     f"{view.energy[e]:10.3e} {view.latency[e] / sim.deadline:7.2f} {'x' if executed[e] else '':>3}")
    if last:
        info = last["info"]
        lines.append(f"energy {info['energy_j']:.3e} J (Top-K {info['topk_energy_j']:.3e} J), deviation "
                     f"{info['deviation']:.4g} / budget {info['deviation_budget']:.4g}, kept {info['n_kept']}, "
                     f"replaced {info['n_replaced']}, skipped {info['n_skipped']}, lost {info['n_lost']}")
    return "\n".join(lines) + "\n"


def render_rgb(env) -> np.ndarray:
    """A map of the user (origin), the helpers coloured by channel gain, and the experts that ran."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    sim = env.sim
    state = env._state
    last = env._last
    view = last["view"] if last else env.current_view()
    executed = last["executed"] if last else [0] * sim.n_experts
    fig = Figure(figsize=(6, 5), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    pos = state.plan.helper_positions[int(view.token) - int(state.chunk_start[0]), 0, 0]  # (N, 2)
    gain_db = view.channel_gain_db
    sc = ax.scatter(pos[:, 0], pos[:, 1], c=gain_db, cmap="viridis", s=80, zorder=3)
    fig.colorbar(sc, ax=ax, label="channel gain (dB)")
    ax.scatter([0], [0], marker="*", s=250, c="red", zorder=4, label="user")
    layer = int(view.layer)
    topk = set(view.topk_idx.tolist())
    for e in range(sim.n_experts):
        node = int(sim.hosts[layer, e])
        if node == 0:
            continue
        x, y = pos[node - 1]
        if executed[e]:
            ax.plot([0, x], [0, y], color="tab:orange", lw=2, zorder=2)
        ax.annotate(f"{e}{'*' if e in topk else ''}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    r = env.config.placement.r_max_m
    ax.set_xlim(-1.1 * r, 1.1 * r)
    ax.set_ylim(-1.1 * r, 1.1 * r)
    ax.set_aspect("equal")
    ax.set_title(f"token {int(view.token)}, layer {layer}: orange = executed, * = Top-K", fontsize=9)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def close(env) -> None:
    """Nothing is held open between renders (each picture is a fresh Figure)."""
