"""`ablate report`: one self-contained HTML page per sweep, to read and to send.

Everything is inside the file (styles, figures and sample grids as data URIs, no scripts, nothing
fetched): the impact table, the figures (`ablate plot`), each arm's sample grid at the ranked step,
what each delta changed, throughput and cost per arm, and the arms that failed with their errors.
"""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from ablate.results import plots, render
from ablate.results import rank as ranking
from ablate.running.show import set_aside_note
from ablate.running.store import observe
from ablate.shown import html as escape
from ablate.sweep.schema import BASELINE, Sweep, arm_name
from core.atomic import atomic_write
from core.rundir import CANCELLED, DONE, FAILED, REPORT, STALE, UNREADABLE, RunDir

PAGE_STYLE = render.TABLE_STYLE + (
    "h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}"
    "figure{margin:1em 0}figure img{max-width:100%}figcaption{color:#555}"
    ".grids{display:flex;flex-wrap:wrap;gap:1.2em}.grids figure{margin:0}.grids img{width:256px;"
    "image-rendering:pixelated;border:1px solid #ccc}pre{background:#f6f6f6;padding:.6em;margin:.3em 0}"
    ".failed{color:#b3261e}table.arms td,table.arms th{padding:.2em .6em;text-align:left}"
)


def _img(path: Path, alt: str, **attrs: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    extra = "".join(f' {k}="{escape(v)}"' for k, v in attrs.items())
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}"{extra}>'


def build(sweep: Sweep, df: ranking.Table, used: int | None, arms: list[ranking.ArmResult]) -> Path:
    """Write `<sweep root>/report.html` (and the figures it embeds) for the table `ranking.rank` made at
    step `used` from `arms`; returns its path."""
    figures = plots.write(sweep, df, arms)
    title = render.title(sweep, used)
    body = [
        f"<h1>{escape(sweep.name)}: which decision matters?</h1>",
        f"<p>{len(sweep.deltas)} delta(s) at {_seeds(sweep)} against one baseline; "
        f"ranked by {escape(', '.join(f'{m} ({d})' for m, d in sweep.metrics))}. "
        f"Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from {escape(str(sweep.root))}.</p>",
        "<h2>Impact</h2>",
        render.to_html(df, sweep.metrics, title),
        "<h2>Figures</h2>",
    ]
    captions = {
        "impact": "Each delta's change per metric, in % of the baseline, with its 95% interval.",
        "curves": "Every metric against the training step; the band is the range over seeds.",
        "tradeoff": "Where each delta lands between speed and quality.",
    }
    for name, path in figures.items():
        body.append(f"<figure>{_img(path, name)}<figcaption>{escape(captions[name])}</figcaption></figure>")
    body += _grids(sweep, used)
    body += _changes(sweep)
    body += _arms(sweep, arms)
    page = render.HTML_PAGE.format(title=escape(title), style=PAGE_STYLE, body="\n".join(body))
    path = sweep.root / REPORT
    atomic_write(path, page)
    return path


def _grids(sweep: Sweep, step: int | None) -> list[str]:
    out = [
        f"<h2>Samples at step {step}</h2>" if step is not None else "<h2>Samples</h2>",
        '<div class="grids">',
    ]
    for delta, seed in sweep.arms():
        name = arm_name(delta, seed)
        grid = RunDir(sweep.root / name).eval_grid(step) if step is not None else None
        inner = "<p>no samples</p>"
        if grid is not None and grid.is_file():
            try:
                inner = _img(grid, f"samples of {name}")
            except OSError as e:
                inner = f"<p>{escape(str(grid))}: unreadable ({escape(e.strerror or type(e).__name__)})</p>"
        out.append(f"<figure>{inner}<figcaption>{escape(name)}</figcaption></figure>")
    return [*out, "</div>"]


def _changes(sweep: Sweep) -> list[str]:
    out = ["<h2>What each delta changes</h2>"]
    for delta, overrides in sweep.deltas.items():
        text = yaml.safe_dump(overrides, sort_keys=False, default_flow_style=False).strip()
        out.append(f"<h3>{escape(delta)}</h3><pre>{escape(text)}</pre>")
    return out


def _arms(sweep: Sweep, arms: list[Any]) -> list[str]:
    launcher = sweep.launcher
    devices = launcher.nodes * (launcher.gpus_per_node or launcher.tasks_per_node)
    out = [
        "<h2>Arms: throughput, cost, failures</h2>",
        '<table class="arms"><tr><th>arm</th><th>state</th><th>steps</th><th>batches/s</th><th>GPU-h</th>'
        "<th>note</th></tr>",
    ]
    failed = []
    for arm in arms:
        view = observe(sweep.root / arm.name, check_jobs=False)
        note = "; ".join(n for n in (arm.note or view.note, set_aside_note(view.status)) if n)
        hours = arm.steps / arm.batches_per_s / 3600 * devices if arm.steps and arm.batches_per_s else None
        bad = arm.state in (FAILED, UNREADABLE, CANCELLED, STALE)
        cls = ' class="failed"' if bad else ""
        out.append(
            f"<tr{cls}><td>{escape(arm.name)}</td><td>{escape(arm.state)}</td><td>{arm.steps or ''}</td>"
            f"<td>{'' if not arm.batches_per_s else f'{arm.batches_per_s:.3g}'}</td>"
            f"<td>{'' if hours is None else f'{hours:.3g}'}</td><td>{escape(note)}</td></tr>"
        )
        if bad:
            failed.append((arm.name, arm.state, note))
    out.append("</table>")
    out.append("<h2>Failed arms</h2>")
    if not failed:
        out.append(f"<p>None: every arm that ran is {DONE} or still in flight.</p>")
    for name, state, note in failed:
        out.append(
            f'<p class="failed"><b>{escape(name)}</b> ({escape(state)}): {escape(note or "no error recorded")}</p>'
        )
    return out


def _seeds(sweep: Sweep) -> str:

    base, deltas = sweep.seeds_of(BASELINE), next((sweep.seeds_of(d) for d in sweep.deltas), [])
    if base == deltas or not sweep.deltas:
        return f"{len(base)} seed(s)"
    return f"{len(deltas)} seed(s) (the baseline at {len(base)})"
