"""`ablate plot` and `ablate report` on hand-made run folders: the figures' bars and lines, the page in a real browser."""

from __future__ import annotations

import base64
import io
import re
import subprocess

import numpy as np
import pytest
from ablate_testing import write_json
from matplotlib.container import BarContainer
from PIL import Image

from ablate.results import plots
from ablate.results import rank as ranking
from ablate.sweep.schema import load_sweep
from core.sweepdir import SweepDir

SWEEP = """\
name: rep
baseline: {eval: {metrics: [prompt_adherence]}}
deltas:
  faster: {x: 1}
  better: {x: 2}
  broken: {x: 3}
seeds: [0, 1]
rank_by:
  - val_loss: lower
  - prompt_adherence: higher
"""
LOSS = {"baseline": 1.0, "faster": 1.02, "better": 0.7}


def arm(root, name, by_step, bps, grid_value):
    write_json(root / name / "spec.json", {"name": name})
    write_json(root / name / "status.json", {"state": "done", "step": max(by_step)})
    write_json(root / name / "result.json", {"step": max(by_step), "throughput": {"batches_per_s": bps}})
    for step, metrics in by_step.items():
        write_json(root / name / "eval" / f"step_{step}.json", {"step": step, "metrics": metrics})
    Image.fromarray(np.full((34, 34, 3), grid_value, np.uint8)).save(
        root / name / "eval" / f"step_{max(by_step)}.png"
    )


@pytest.fixture
def sweep(write_sweep):
    s = load_sweep(write_sweep(SWEEP))
    SweepDir(s.root).write_mark(s.name)  # a sweep folder as `ablate run` makes it
    for delta, loss in LOSS.items():
        for seed in (0, 1):
            jitter = 0.01 * (seed - 0.5)
            by_step = {
                s_: {"val_loss": loss + jitter + 1 / s_, "prompt_adherence": 2 - loss + jitter}
                for s_ in (10, 20)
            }
            arm(s.root, f"{delta}-s{seed}", by_step, 20.0 if delta == "faster" else 10.0, 40 + 80 * seed)
    write_json(s.root / "broken-s0" / "spec.json", {"name": "broken-s0"})
    write_json(
        s.root / "broken-s0" / "status.json",
        {"state": "failed", "error": "NonFiniteError: loss is nan at step 7"},
    )
    return s


def test_figures_have_a_bar_per_delta_and_a_line_per_arm(sweep):
    df, step, _ = ranking.rank(sweep)
    impact = plots.impact(df, sweep.metrics)
    for ax in impact.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 2  # faster and better have numbers; broken and its missing seed do not
        assert [t.get_text() for t in ax.get_yticklabels()] == ["better", "faster", "broken"]
        assert ax.get_xlabel().startswith("change vs baseline (% of the baseline's")
    curves = plots.curves(ranking.collect(sweep), sweep.metrics)
    assert [len(ax.get_lines()) for ax in curves.axes] == [3, 3]  # baseline, faster, better
    assert all(ax.get_xlabel() == "training step" for ax in curves.axes)
    trade = plots.tradeoff(df, sweep.metrics)
    (ax,) = trade.axes
    assert len(ax.collections) == 2 and {t.get_text() for t in ax.texts} == {"faster", "better"}
    written = plots.write(sweep, df, ranking.collect(sweep))
    assert sorted(written) == ["curves", "impact", "tradeoff"] and all(
        p.stat().st_size > 5000 for p in written.values()
    )


def test_report_is_one_page_that_a_real_browser_loads_cleanly(sweep, cli, chromium, tmp_path):
    result = cli("report", sweep.file)
    assert result.code == 0, result.err
    page = sweep.root / "report.html"
    html = page.read_text()
    assert '<table class="impact">' in html and "NonFiniteError: loss is nan at step 7" in html
    assert 'src="http' not in html and "<script" not in html  # self-contained: nothing fetched, nothing run
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 3 + 6  # three figures; a grid per arm that has one (broken's two say "no samples")
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()

    browser = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr", "--v=0",
    ]  # fmt: skip
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []  # the page logs no errors
    assert dom.stdout.count("<img") == 9 and 'class="impact"' in dom.stdout and "seed ±" in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10  # rendered: text, tables and figures, not a blank page
