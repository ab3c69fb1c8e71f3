"""`ablate stack`: do the winners add up? The natural next sweep after an ablation.

From a ranked sweep, take the K deltas that improved the chosen metric most — among those whose
95% interval excludes zero, unless asked to take any — and write a new sweep file whose baseline
is the old baseline with all K applied, and whose deltas each leave one of them out
(`without-<delta>`: that delta's settings back to the old baseline's resolved values). If the
winners add up, every leave-one-out arm is worse than the stacked baseline.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import UserError
from ablate.sweep.expand import merge
from ablate.sweep.loader import KeyPath
from ablate.sweep.schema import BASELINE, Seeds, Sweep, delta_tree


def winners(df: Any, sweep: Sweep, top: int, by: str | None, any_change: bool) -> list[str]:
    """The `top` deltas that improved `by` most (significantly, unless `any_change`), best first."""
    metric = by or sweep.metrics[0][0]
    sign = -1.0 if dict(sweep.metrics)[metric] == "lower" else 1.0
    rows = [r for r in df.to_dict("records") if r["delta"] != BASELINE]
    gains = [(sign * r[f"{metric}_change"], r) for r in rows if not math.isnan(r[f"{metric}_change"])]
    chosen = [r["delta"] for g, r in sorted(gains, key=lambda x: -x[0])
              if g > 0 and (any_change or r[f"{metric}_significant"])]  # fmt: skip
    if not chosen:
        why = "improved it" if any_change else "improved it with a 95% interval that excludes zero"
        hint = (
            "more seeds (an interval needs two), or --any to stack the best means" if not any_change else None
        )
        raise UserError(f"no delta {why} ({metric})", hint, path="--top")
    return chosen[:top]


def _units(tree: dict[str, Any], base: Any, prefix: KeyPath = ()) -> list[KeyPath]:
    """The paths a delta's tree sets as units: a leaf, or a whole component where the baseline's differs
    in kind or is off (a new kind, or a factor turned on, is the delta's in full)."""
    out: list[KeyPath] = []
    for key, value in tree.items():
        path = (*prefix, key)
        old = base.get(key) if isinstance(base, dict) else None
        same = (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("kind", old.get("kind")) == old.get("kind")
        )
        out += _units(value, old, path) if same and value else [path]
    return out


def _at(config: dict[str, Any], path: KeyPath) -> Any:
    node: Any = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return copy.deepcopy(node)


def stacked(sweep: Sweep, chosen: list[str]) -> dict[str, Any]:
    """The new sweep (as a mapping): the old baseline plus every winner, and one leave-one-out delta each."""
    from ablate.sweep.expand import expand

    resolved = next(
        s.config for s in expand(sweep) if s.delta == BASELINE
    )  # defaults filled in: what "back" means
    baseline = copy.deepcopy(sweep.baseline)
    owner: dict[KeyPath, str] = {}
    deltas: dict[str, dict[str, Any]] = {}
    for delta in chosen:
        tree, _ = delta_tree(sweep, delta, sweep.deltas[delta])
        paths = _units(tree, resolved)
        for path in paths:
            clash = next((o for p, o in owner.items() if p[: len(path)] == path or path[: len(p)] == p), None)
            if clash is not None:
                raise UserError(
                    f"deltas '{clash}' and '{delta}' both change {'.'.join(map(str, path))}: they cannot be stacked",
                    "--top smaller, or one of them left out of the sweep",
                    path="--top",
                )
            owner[path] = delta
        baseline, _ = merge(baseline, tree)
        deltas[f"without-{delta}"] = {".".join(map(str, p)): _at(resolved, p) for p in paths}
    launcher = sweep.launcher.model_dump(exclude_defaults=True)
    return {
        "name": f"{sweep.name}-stack",
        "output_dir": str(sweep.root.parent / f"{sweep.name}-stack"),
        "baseline": baseline,
        "deltas": deltas,
        "seeds": sweep.seeds.model_dump() if isinstance(sweep.seeds, Seeds) else list(sweep.seeds),
        "launcher": {"executor": sweep.launcher.executor, **launcher},
        "rank_by": sweep.rank_by,
    }


def write(sweep: Sweep, chosen: list[str], df: Any, by: str | None, out: Path) -> Path:
    """Write the stacked sweep to `out` (refusing to overwrite a file) after validating every arm."""
    from ablate.sweep.expand import expand
    from ablate.sweep.schema import load_sweep

    if out.exists():
        raise UserError(f"{out} exists; not overwritten", "another --out FILE", path="--out")
    metric = by or sweep.metrics[0][0]
    notes = [f"#   {d}: {metric} {df.row(d)[f'{metric}_change']:+.4g} "
             f"[{df.row(d)[f'{metric}_ci_low']:+.3g}, {df.row(d)[f'{metric}_ci_high']:+.3g}]" for d in chosen]  # fmt: skip
    header = [
        f"# Stacked from {sweep.file} by `ablate stack`: its baseline plus the {len(chosen)} delta(s) that",
        f"# improved {metric} most (change vs its baseline [95% paired-t interval]):",
        *notes,
        "# Each `without-X` delta leaves one of them out: if the winners add up, every one of them is worse.",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(header) + "\n" + yaml.safe_dump(stacked(sweep, chosen), sort_keys=False)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    try:
        expand(load_sweep(tmp))  # the new sweep must validate, arm by arm, before it is handed over
    except UserError as e:  # said of the user's sweep file: the temporary file is gone
        where = f"{e.path}: " if e.path else ""
        raise UserError(
            f"the stacked sweep for {out} does not validate, nothing written: {where}{e.problem}",
            e.expected,
            file=sweep.file,
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    from core.atomic import atomic_write

    atomic_write(out, text)
    return out
