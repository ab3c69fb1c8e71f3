"""The impact table as people and programs read it: one entry of `FORMATS` per `ablate rank --format`.

The numbers come from `rank.py`; here they become text: a rich table for terminals (one column per
metric, colours for better and worse), csv, markdown, json, and an HTML fragment and page (also the
report's). Each format says whether it prints on the console and where the footer under it goes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ablate.results import stats
from ablate.sweep.schema import BASELINE, Sweep

if TYPE_CHECKING:
    import pandas as pd

    from ablate.results.rank import ArmResult


@dataclass(frozen=True)
class Format:
    """One `--format`: how the table renders (from the ranking, the sweep and the step ranked at)."""

    render: Callable[[pd.DataFrame, Sweep, int | None], Any]
    terminal: bool = False
    """a rich renderable printed on the console (its width, its colours); else text written to stdout as is"""
    footer_on_stdout: bool = False
    """the footer is for people under the table; machine-read formats keep stdout to the table (stderr)"""


def title(sweep: Sweep, step: int | None) -> str:
    where = f"at step {step}" if step is not None else "(no arm has evaluated yet)"
    return f"{sweep.name}: change vs baseline {where}, paired by seed"


def footer(sweep: Sweep, arms: list[ArmResult], changed: dict[str, str]) -> list[str]:
    """The lines under the table: arms that could not be read, and arms ranked with results of an older
    config (`changed`, from `drift`)."""
    lines = [f"unreadable: {a.name}: {a.note}" for a in arms if a.state == "unreadable"]
    for name, note in changed.items():
        lines.append(f"† {name}: {note}")
    if changed:
        lines.append(
            f"† ranked with results of the config it ran with; `ablate run {sweep.file} --rerun NAME` runs it again"
        )
    return lines


def to_json(df: pd.DataFrame, sweep: Sweep, step: int | None) -> str:
    rows = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]
    rank_by = [{metric: better} for metric, better in sweep.metrics]
    return json.dumps({"sweep": sweep.name, "step": step, "rank_by": rank_by, "rows": rows}, indent=2)


NOISE_FLOOR = "noise floor"


def cells(df: pd.DataFrame, metrics: list[tuple[str, str]]) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """Human-readable header and cells; each cell with its sign: +1 better, −1 worse, 0 neutral.

    Per metric: the value, the change (mean over paired seeds, its interval, * when significant), the
    change in %. After the baseline, the noise-floor row: the baseline's spread over seeds.
    """
    header = ["delta", "state", "seeds"]
    for metric, direction in metrics:
        header += [f"{metric} {'↓' if direction == 'lower' else '↑'}", "Δ [95% CI]", "Δ%"]
    header += ["batches/s", "speed", "GPU-h", "cost"]
    out = []
    for r in df.to_dict("records"):
        row = [(str(r["delta"]), 0), (str(r["state"]), 0), (str(r["seeds"]), 0)]
        for metric, direction in metrics:
            change, pct = r[f"{metric}_change"], r[f"{metric}_change_pct"]
            good = (
                0
                if math.isnan(change) or change == 0
                else (1 if (change < 0) == (direction == "lower") else -1)
            )
            row += [
                (_num(r[metric], "{:.4g}"), 0),
                (_change_text(r, metric), good),
                (_num(pct, "{:+.1f}%"), good),
            ]
        ratio, cost = r["throughput_ratio"], r["cost_ratio"]
        row += [
            (_num(r["batches_per_s"], "{:.3g}"), 0),
            (
                _num(ratio, "{:.2f}x"),
                0 if math.isnan(ratio) else (1 if ratio > 1 else -1 if ratio < 1 else 0),
            ),
            (_num(r["gpu_hours"], "{:.3g}"), 0),
            (_num(cost, "{:.2f}x"), 0 if math.isnan(cost) else (1 if cost < 1 else -1 if cost > 1 else 0)),
        ]
        out.append(row)
        if r["delta"] == BASELINE:
            noise = [(NOISE_FLOOR, 0), ("baseline spread", 0), ("", 0)]
            for metric, _ in metrics:
                floor = r[f"{metric}_noise_floor"]
                noise += [
                    ("", 0),
                    (_num(floor, "±{:.3g}") if not math.isnan(floor) else "1 seed: none", 0),
                    ("", 0),
                ]
            out.append(noise + [("", 0)] * 4)
    return header, out


def _change_text(r: dict[str, Any], metric: str) -> str:
    change, low, high, n = (
        r[f"{metric}_change"],
        r[f"{metric}_ci_low"],
        r[f"{metric}_ci_high"],
        r[f"{metric}_pairs"],
    )
    if math.isnan(change):
        return "—"
    text = f"{change:+.4g}"
    if n >= 2 and not math.isnan(low):
        text += f" [{low:+.3g}, {high:+.3g}]" + ("*" if r[f"{metric}_significant"] else "")
    else:
        text += " (1 seed)"
    return text


def _num(x: float, fmt: str) -> str:
    return "—" if x is None or math.isnan(x) else fmt.format(x)


LEGEND = (
    f"↓ lower is better, ↑ higher is better. Δ = delta − baseline at the same seed, mean over seeds with its "
    f"{stats.INTERVAL}; * = the interval excludes zero; one seed gives no interval. Δ% relative to the "
    "baseline. noise floor = the baseline's standard deviation over seeds. speed = batches/s relative to the "
    "baseline; GPU-h = steps ÷ batches/s × devices per arm; cost = GPU-hours relative to the baseline."
)


LEGEND_TERMINAL = (
    "↓ lower is better, ↑ higher is better; green = better than the baseline. Each metric: the value at the "
    f"step, below it the change against the baseline at the same seed (mean, {stats.INTERVAL}, * when it "
    "excludes zero; in %). noise floor: the baseline's spread over seeds. speed = batches/s and cost = "
    "GPU-hours relative to the baseline. --format csv|markdown|json|html for every column."
)


def to_markdown(df: pd.DataFrame, metrics: list[tuple[str, str]]) -> str:
    header, rows = cells(df, metrics)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    lines += ["| " + " | ".join(text.replace("|", "\\|") for text, _ in row) + " |" for row in rows]
    return "\n".join([*lines, "", LEGEND])


def to_rich(df: pd.DataFrame, metrics: list[tuple[str, str]], title: str):
    from rich.table import Table
    from rich.text import Text

    header, rows = cells(df, metrics)
    # On a terminal each metric is one column — its value, then the change (and %), then the interval —
    # and speed and cost share two columns, so a sweep with four metrics fits 120 columns;
    # csv/markdown/json/html keep every number apart.
    merged = header[:3] + [header[3 + 3 * i] for i in range(len(metrics))] + ["speed", "cost"]
    table = Table(title=title, title_justify="left", caption=LEGEND_TERMINAL, caption_justify="left")
    for i, name in enumerate(merged):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)

    def style(good: int) -> str:
        return "green" if good > 0 else "red" if good < 0 else ""

    for row in rows:
        if row[0][0] == NOISE_FLOOR:
            out = [Text(t, style="dim") for t, _ in row[:3]]
            out += [Text(row[4 + 3 * i][0], style="dim") for i in range(len(metrics))] + [Text("")] * 2
            table.add_row(*out)
            continue
        out = [Text(t) for t, _ in row[:3]]
        for i in range(len(metrics)):
            (value, _), (change, good), (pct, _) = row[3 + 3 * i : 6 + 3 * i]
            if pct in ("—", ""):
                out.append(Text(value))
                continue
            delta, _, interval = change.partition(" ")
            lines = f"{value}\n{delta} ({pct})" + (f"\n{interval}" if interval else "")
            out.append(Text(lines, style=style(good)))
        (bps, _), (speed, fast), (hours, _), (cost, cheap) = row[-4:]
        for number, unit, ratio, good in ((bps, "b/s", speed, fast), (hours, "GPU-h", cost, cheap)):
            text = "—" if number == "—" else f"{number} {unit}" + ("" if ratio == "—" else f"\n{ratio}")
            out.append(Text(text, style=style(good)))
        table.add_row(*out)
    return table


def to_html(df: pd.DataFrame, metrics: list[tuple[str, str]], title: str) -> str:
    """The table as an HTML fragment (a `<table class="impact">` and its legend), for `--format html`
    and the report; better/worse cells carry the classes `better`/`worse`, significant ones `significant`."""
    from html import escape

    header, rows = cells(df, metrics)
    out = [f'<table class="impact"><caption>{escape(title)}</caption><thead><tr>']
    out += [f"<th>{escape(h)}</th>" for h in header] + ["</tr></thead><tbody>"]
    for row in rows:
        kind = ' class="noise"' if row[0][0] == NOISE_FLOOR else ""
        out.append(f"<tr{kind}>")
        for i, (text, good) in enumerate(row):
            classes = ["better" if good > 0 else "worse" if good < 0 else ""]
            classes.append("significant" if text.endswith("*") else "")
            classes.append("num" if i >= 3 else "")
            cls = " ".join(c for c in classes if c)
            out.append(f'<td class="{cls}">{escape(text)}</td>' if cls else f"<td>{escape(text)}</td>")
        out.append("</tr>")
    out.append(f'</tbody></table><p class="legend">{escape(LEGEND)}</p>')
    return "".join(out)


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>
<body>{body}</body></html>
"""
TABLE_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}"
    "table.impact{border-collapse:collapse;margin:1em 0}table.impact caption{text-align:left;font-weight:600;"
    "padding:.4em 0}table.impact th,table.impact td{border-bottom:1px solid #ddd;padding:.3em .6em;"
    "white-space:nowrap}table.impact td.num{text-align:right;font-variant-numeric:tabular-nums}"
    ".better{color:#11772d}.worse{color:#b3261e}.significant{font-weight:700}tr.noise td{color:#777;"
    "font-style:italic}.legend{color:#555;max-width:60em}"
)


def _page(df: pd.DataFrame, sweep: Sweep, step: int | None) -> str:
    heading = title(sweep, step)
    return HTML_PAGE.format(title=heading, style=TABLE_STYLE, body=to_html(df, sweep.metrics, heading))


FORMATS: dict[str, Format] = {
    "table": Format(
        lambda df, sweep, step: to_rich(df, sweep.metrics, title(sweep, step)),
        terminal=True,
        footer_on_stdout=True,
    ),
    "csv": Format(lambda df, sweep, step: df.to_csv(index=False)),
    "markdown": Format(lambda df, sweep, step: to_markdown(df, sweep.metrics) + "\n", footer_on_stdout=True),
    "json": Format(lambda df, sweep, step: to_json(df, sweep, step) + "\n"),
    "html": Format(_page),
}
