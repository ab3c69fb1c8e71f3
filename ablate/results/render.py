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

from ablate.shown import inert
from ablate.sweep.schema import BASELINE, Sweep

if TYPE_CHECKING:
    from ablate.results.rank import ArmResult, Table


@dataclass(frozen=True)
class Format:
    """One `--format`: how the table renders (from the ranking, the sweep and the step ranked at)."""

    render: Callable[[Table, Sweep, int | None], Any]
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
            f"† ranked with results of the settings it ran or was scored with; `ablate run {sweep.file}` re-scores "
            "changed evaluation settings, `--rerun NAME` trains a changed config again"
        )
    return lines


def to_json(df: Table, sweep: Sweep, step: int | None) -> str:
    rows = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]
    rank_by = [{metric: better} for metric, better in sweep.metrics]
    return json.dumps({"sweep": sweep.name, "step": step, "rank_by": rank_by, "rows": rows}, indent=2)


NOISE_FLOOR = "noise"
PER_METRIC = 4  # columns per metric: value, change with its interval, q, change in %
COSTS = 4  # batches/s, speed, GPU-h, cost


def cells(df: Table, metrics: list[tuple[str, str]]) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """Human-readable header and cells; each cell with its sign: +1 better, −1 worse, 0 neutral.

    Per metric: the value; the change (mean over paired seeds), its 95% interval and the noise it covers;
    q (* when significant, else the seeds that would resolve a change of this size); the change in %.
    After the baseline, the noise row: the seed spread of a paired change and the eval spread."""
    header = ["delta", "state", "seeds"]
    for metric, direction in metrics:
        header += [f"{metric} {'↓' if direction == 'lower' else '↑'}", "Δ [95% CI] noise", "q", "Δ%"]
    header += ["batches/s", "speed [95% CI]", "GPU-h", "cost"]
    out = []
    for r in df.to_dict("records"):
        row = [(str(r["delta"]), 0), (str(r["state"]), 0), (str(r["seeds"]), 0)]
        for metric, direction in metrics:
            change = r[f"{metric}_change"]
            good = (
                0
                if math.isnan(change) or change == 0
                else (1 if (change < 0) == (direction == "lower") else -1)
            )
            row += [(_num(r[metric], "{:.4g}"), 0), (_change_text(r, metric), good), (_q_text(r, metric), good),
                    (_num(r[f"{metric}_change_pct"], "{:+.1f}%"), good)]  # fmt: skip
        row += _cost_cells(r)
        out.append(row)
        if r["delta"] == BASELINE:
            noise = [(NOISE_FLOOR, 0), ("of a change", 0), ("", 0)]
            for metric, _ in metrics:
                noise += [("", 0), (_noise_text(r, metric), 0), ("", 0), ("", 0)]
            out.append(noise + [("", 0)] * COSTS)
    return header, out


def _change_text(r: dict[str, Any], metric: str) -> str:
    change, low, high = r[f"{metric}_change"], r[f"{metric}_ci_low"], r[f"{metric}_ci_high"]
    if math.isnan(change):
        return "—"
    if math.isnan(low):
        return f"{change:+.4g} (no interval: 1 seed, no eval resamples)"
    return f"{change:+.4g} [{low:+.3g}, {high:+.3g}] {r[f'{metric}_noise']}"


def _q_text(r: dict[str, Any], metric: str) -> str:
    q = r[f"{metric}_q"]
    if q is None or math.isnan(q):
        return "—"
    if r[f"{metric}_significant"]:
        return f"{q:.2g}*"
    needed, n = r[f"{metric}_seeds_needed"], r[f"{metric}_pairs"]
    more = f" → {needed} seeds" if needed is not None and not _nan(needed) and needed > n else ""
    return f"{q:.2g}{more}"


def _noise_text(r: dict[str, Any], metric: str) -> str:
    sd, eval_sd = r[f"{metric}_sd"], r[f"{metric}_eval_sd"]
    parts = [
        f"seed ±{sd:.3g}" if not _nan(sd) else "seed: 1 seed",
        f"eval ±{eval_sd:.3g}" if not _nan(eval_sd) else "",
    ]
    return " · ".join(p for p in parts if p)


def _cost_cells(r: dict[str, Any]) -> list[tuple[str, int]]:
    ratio, cost, drift = r["throughput_ratio"], r["cost_ratio"], r["speed_drift"]
    speed = _num(ratio, "{:.2f}x")
    if not _nan(r["speed_low"]):
        speed += f" [{r['speed_low']:.2f}, {r['speed_high']:.2f}]"
    if not _nan(drift):
        speed += f" ⚠ drift {drift:.2f}x"
    fast = 0 if _nan(ratio) else (1 if ratio > 1 else -1 if ratio < 1 else 0)
    cheap = 0 if _nan(cost) else (1 if cost < 1 else -1 if cost > 1 else 0)
    return [(_num(r["batches_per_s"], "{:.3g}"), 0), (speed, fast), (_num(r["gpu_hours"], "{:.3g}"), 0),
            (_num(cost, "{:.2f}x"), cheap)]  # fmt: skip


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: float, fmt: str) -> str:
    return "—" if _nan(x) else fmt.format(x)


def legend(df: Table, terminal: bool = False) -> str:
    """What every number of the table means, with the interval and the rule that made it."""
    interval, rule = df.attrs.get("interval", "moderated"), df.attrs.get("rule", "bh")
    seed = ("seed = seed noise, its variance moderated across the table's deltas (limma-style empirical Bayes)"
            if interval == "moderated" else "seed = seed noise, each delta's own paired-t")  # fmt: skip
    control = (
        "the false-discovery rate (Benjamini–Hochberg)"
        if rule == "bh"
        else "the family-wise error rate (Holm)"
    )
    lead = ("↓ lower is better, ↑ higher is better; green = better than the baseline. "
            if terminal else "↓ lower is better, ↑ higher is better. ")  # fmt: skip
    return (
        f"{lead}Δ = delta − baseline at the same seed, mean over seeds, with its 95% interval and the noise it "
        f"covers: {seed}; eval = a paired bootstrap over the eval prompts (at one seed the interval is only "
        "that: training noise not estimated); seed+eval = both. q = p adjusted over every change of the table, "
        f"controlling {control} at 5%: * = q ≤ 0.05, a verdict; otherwise → N seeds = the seeds in all that "
        "would resolve a change of this size at 80% power, at the level the rule asks of the next verdict. noise = the spread of a paired change over seeds "
        "(pooled) and over prompt resamples. speed = the baseline's median step time over the delta's, with its "
        "95% interval over log windows and seeds (⚠ drift: the step time changed by more than 25% within the "
        "run: a shared or throttled node); GPU-h = steps × median step time × devices; cost = GPU-hours relative "
        "to the baseline." + (" --format csv|markdown|json|html for every column." if terminal else "")
    )


def to_markdown(df: Table, metrics: list[tuple[str, str]]) -> str:
    header, rows = cells(df, metrics)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|",
    ]
    lines += ["| " + " | ".join(text.replace("|", "\\|") for text, _ in row) + " |" for row in rows]
    return "\n".join([*lines, "", legend(df)])


def to_rich(df: Table, metrics: list[tuple[str, str]], title: str):
    from rich.table import Table
    from rich.text import Text

    header, rows = cells(df, metrics)
    # On a terminal each metric is one column — its value, the change (and %), the interval, q and the
    # noise it covers, the seeds to add — and speed and cost share two columns, so a sweep with four
    # metrics fits 150 columns;
    # csv/markdown/json/html keep every number apart.
    merged = header[:3] + [header[3 + PER_METRIC * i] for i in range(len(metrics))] + ["speed", "cost"]
    table = Table(
        title=title, title_justify="left", caption=legend(df, terminal=True), caption_justify="left"
    )
    for i, name in enumerate(merged):
        table.add_column(name, justify="left" if i < 3 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*_rich_row(row, len(metrics), Text))
    return table


def _rich_row(row: list[tuple[str, int]], metrics: int, Text) -> list:
    def style(good: int) -> str:
        return "green" if good > 0 else "red" if good < 0 else ""

    if row[0][0] == NOISE_FLOOR:
        out = [Text(t, style="dim") for t, _ in row[:3]]
        noise = [Text(row[4 + PER_METRIC * i][0].replace(" · ", "\n"), style="dim") for i in range(metrics)]
        return out + noise + [Text("")] * 2
    out = [Text(inert(t)) for t, _ in row[:3]]
    for i in range(metrics):
        (value, _), (change, good), (q, _), (pct, _) = row[3 + PER_METRIC * i : 3 + PER_METRIC * (i + 1)]
        if pct in ("—", ""):
            out.append(Text(value))
            continue
        # one short line each: the change (%), its interval, q and the noise the interval covers, seeds to add
        delta, _, interval = change.partition(" ")
        interval, _, noise = interval.rpartition("] ") if interval.startswith("[") else ("", "", "")
        q, _, more = q.partition(" → ")
        lines = [value, f"{delta} ({pct})", f"{interval}]" if interval else "no interval",
                 f"q {q} {noise}" if q != "—" else "", f"→ {more}" if more else ""]  # fmt: skip
        out.append(Text("\n".join(line for line in lines if line), style=style(good)))
    (bps, _), (speed, fast), (hours, _), (cost, cheap) = row[-COSTS:]
    for number, unit, ratio, good in ((bps, "b/s", speed, fast), (hours, "GPU-h", cost, cheap)):
        text = "—" if number == "—" else f"{number} {unit}" + ("" if ratio == "—" else f"\n{ratio}")
        out.append(Text(text.replace(" [", "\n[").replace(" ⚠", "\n⚠"), style=style(good)))
    return out


def to_html(df: Table, metrics: list[tuple[str, str]], title: str) -> str:
    """The table as an HTML fragment (a `<table class="impact">` and its legend), for `--format html`
    and the report; better/worse cells carry the classes `better`/`worse`, significant ones `significant`."""
    from ablate.shown import html as escape

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
    out.append(f'</tbody></table><p class="legend">{escape(legend(df))}</p>')
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


def _page(df: Table, sweep: Sweep, step: int | None) -> str:
    heading = title(sweep, step)
    return HTML_PAGE.format(title=heading, style=TABLE_STYLE, body=to_html(df, sweep.metrics, heading))


FORMATS: dict[str, Format] = {
    "table": Format(
        lambda df, sweep, step: to_rich(df, sweep.metrics, title(sweep, step)),
        terminal=True,
        footer_on_stdout=True,
    ),
    "csv": Format(lambda df, sweep, step: df.frame().to_csv(index=False)),
    "markdown": Format(lambda df, sweep, step: to_markdown(df, sweep.metrics) + "\n", footer_on_stdout=True),
    "json": Format(lambda df, sweep, step: to_json(df, sweep, step) + "\n"),
    "html": Format(_page),
}
