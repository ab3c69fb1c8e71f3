"""`ablate plot`: the figures people read an ablation by (matplotlib, headless).

- impact.png: per metric, each delta's change against the baseline in % of the baseline, as a bar
  with its 95% interval as whiskers; solid when the interval excludes zero (green better, red
  worse), pale when it does not; the grey band is the baseline's noise floor.
- curves.png: per metric, its value against the training step for every arm: the mean over seeds
  as a line, the range over seeds as a band; the baseline in black.
- tradeoff.png: where each delta lands between speed and quality: throughput against the baseline
  (×) across, the change of the first ranked metric (%, better upwards) up.

Every builder returns the Figure (tests count its bars and lines); `write` saves them as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ablate.sweep.schema import BASELINE
from core.rundir import FIGURES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ablate.results.rank import ArmResult, Table

BETTER, WORSE, UNSURE, BASE = "#1b7f3b", "#b3261e", "#b8b8b8", "#111111"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a login node or in CI
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, width: float, row_height: float):
    plt = _pyplot()
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, row_height * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _better(change: float, direction: str) -> bool:
    return (change < 0) == (direction == "lower")


def impact(df: Table, metrics: list[tuple[str, str]]) -> Figure:
    """Each delta's change per metric, in % of the baseline, with its 95% interval, q, and the two noise
    scales of a change (seed, eval) shaded around zero."""
    deltas = [d for d in df["delta"] if d != BASELINE]
    base = df.row(BASELINE) if BASELINE in set(df["delta"]) else None
    fig, axes = _grid(len(metrics), 12, 0.45 * len(deltas) + 1.6)
    for ax, (metric, direction) in zip(axes, metrics, strict=True):
        scale = (
            abs(base[metric])
            if base is not None and base[metric] and not math.isnan(base[metric])
            else math.nan
        )
        _noise_bands(ax, base, metric, scale)
        for y, delta in enumerate(deltas):
            _impact_bar(ax, y, df.row(delta), metric, direction, scale)
        ax.axvline(0, color="#555", linewidth=0.8)
        low, high = ax.get_xlim()
        ax.set_xlim(low, high + 0.35 * (high - low))  # room for the q labels right of the bars
        ax.set_yticks(range(len(deltas)), deltas)
        ax.invert_yaxis()  # ranked order, best first
        arrow = "← better" if direction == "lower" else "better →"
        ax.set_xlabel(f"change vs baseline (% of the baseline's {metric})   {arrow}")
        ax.set_title(metric)
    fig.suptitle(
        "Impact of each delta: bars = mean change over seeds, whiskers = 95% interval (seed, eval or both), then q\n"
        "green/red: a verdict (q ≤ 0.05 over the whole table); grey: not resolved; shaded: ±1.96 × the seed "
        "(dark) and eval (light) spread of a change",
        fontsize=10,
    )
    return fig


def _noise_bands(ax, base: Any, metric: str, scale: float) -> None:
    if base is None or math.isnan(scale):
        return
    for key, color, label in (
        (f"{metric}_eval_sd", "#f3f3f3", "eval noise"),
        (f"{metric}_sd", "#dddddd", "seed noise"),
    ):
        if not math.isnan(sd := base[key]):
            ax.axvspan(-196 * sd / scale, 196 * sd / scale, color=color, zorder=0, label=label)


def _impact_bar(ax, y: int, r: Any, metric: str, direction: str, scale: float) -> None:
    change = r[f"{metric}_change"]
    if math.isnan(change) or math.isnan(scale):
        why = "  no data" if math.isnan(change) else "  n/a: the baseline is 0"
        ax.text(0, y, why, va="center", fontsize=8, color="#777")
        return
    pct = 100 * change / scale
    sure = bool(r[f"{metric}_significant"])
    color = (BETTER if _better(change, direction) else WORSE) if sure else UNSURE
    err = None
    if not math.isnan(r[f"{metric}_ci_low"]):
        err = [[pct - 100 * r[f"{metric}_ci_low"] / scale], [100 * r[f"{metric}_ci_high"] / scale - pct]]
    ax.barh(y, pct, color=color, xerr=err, capsize=3, error_kw={"elinewidth": 1, "ecolor": "#333"})
    if not math.isnan(q := r[f"{metric}_q"]):  # right of the bar, its whisker and zero: never on a bar
        right = max(0.0, pct, 100 * r[f"{metric}_ci_high"] / scale if err else pct)
        ax.annotate(f"q={q:.2g} ({r[f'{metric}_noise']})", (right, y), xytext=(4, 0), textcoords="offset points",
                    va="center", fontsize=7, color="#444")  # fmt: skip


def curves(arms: list[ArmResult], metrics: list[tuple[str, str]]) -> Figure:
    """Every metric against the training step: mean over seeds per delta, range over seeds as a band."""
    by_delta: dict[str, list[ArmResult]] = {}
    for arm in arms:
        by_delta.setdefault(arm.delta, []).append(arm)
    fig, axes = _grid(len(metrics), 13, 3.6)
    plt = _pyplot()
    colors = plt.get_cmap("tab10")
    for ax, (metric, direction) in zip(axes, metrics, strict=True):
        others = 0
        for delta, group in by_delta.items():
            steps = sorted({s for a in group for s, m in a.metrics_by_step.items() if metric in m})
            if not steps:
                continue
            values = [[a.metrics_by_step[s][metric] for a in group if metric in a.metrics_by_step.get(s, {})]
                      for s in steps]  # fmt: skip
            means = [sum(v) / len(v) for v in values]
            is_base = delta == BASELINE
            color = BASE if is_base else colors(others % 10)
            others += not is_base
            ax.plot(steps, means, color=color, linewidth=2.6 if is_base else 1.3, label=delta,
                    zorder=3 if is_base else 2, marker="o", markersize=3)  # fmt: skip
            if any(len(v) > 1 for v in values):
                ax.fill_between(
                    steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15
                )
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{metric} ({'lower' if direction == 'lower' else 'higher'} is better)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="arm (band: range over seeds)")
    fig.suptitle("Metrics during training")
    return fig


def tradeoff(df: Table, metrics: list[tuple[str, str]]) -> Figure:
    """Speed against quality: throughput relative to the baseline, and the first metric's improvement in %."""
    plt = _pyplot()
    metric, direction = metrics[0]
    rows = [r for r in df.to_dict("records") if r["delta"] != BASELINE]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    sign = -1.0 if direction == "lower" else 1.0
    for i, r in enumerate(rows):
        x, pct = r["throughput_ratio"], r[f"{metric}_change_pct"]
        if math.isnan(x) or math.isnan(pct):
            continue
        y = sign * pct
        sure = bool(r[f"{metric}_significant"])
        color = (BETTER if y > 0 else WORSE) if sure else UNSURE
        if not math.isnan(r["speed_low"]):  # the speed's interval over windows and seeds
            ax.errorbar([x], [y], xerr=[[x - r["speed_low"]], [r["speed_high"] - x]], color="#777", capsize=2)
        ax.scatter([x], [y], s=60, color=color, edgecolor="#333", zorder=3)
        offset = (8, 8 if i % 2 == 0 else -14)  # alternate above/below so neighbouring labels do not collide
        ax.annotate(r["delta"], (x, y), textcoords="offset points", xytext=offset, fontsize=9)
    ax.axvline(1.0, color="#555", linewidth=0.8)
    ax.axhline(0.0, color="#555", linewidth=0.8)
    ax.set_xlabel("throughput vs baseline (× batches/s; right = faster)")
    ax.set_ylabel(f"{metric} improvement vs baseline (%; up = better)")
    ax.set_title(
        "Speed / quality trade-off (grey: no verdict at q ≤ 0.05; whiskers: the speed's 95% interval)"
    )
    ax.grid(alpha=0.3)
    return fig


def write(sweep: Any, df: Table, arms: list[ArmResult]) -> dict[str, Path]:
    """Save the three figures as PNG under `<sweep root>/figures/`; returns {name: path}."""
    from core.atomic import atomic_path

    plt = _pyplot()
    folder = Path(sweep.root) / FIGURES
    out = {}
    for name, fig in (("impact", impact(df, sweep.metrics)), ("curves", curves(arms, sweep.metrics)),
                      ("tradeoff", tradeoff(df, sweep.metrics))):  # fmt: skip
        path = folder / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[name] = path
    return out
