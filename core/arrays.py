"""The eval step's arrays in a run folder (`core.rundir` names them): the metrics on prompt resamples, one
(metrics, B) .npy, and the per-item features and scores, one .npz. Written atomically, read back checked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.atomic import Unreadable, atomic_path


def write_rows(path: Path, rows: dict[str, Any]) -> list[str]:
    """{name: (B,)} as one (names, B) float32 array; returns the names in its row order."""
    import numpy as np

    names = list(rows)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, np.stack([np.asarray(rows[n], np.float32) for n in names]))
    return names


def read_rows(path: Path, names: Sequence[str]) -> dict[str, Any] | None:
    """{name: (B,) float64} from `write_rows`'s file, None when there is none. Raises `Unreadable` naming a
    damaged file or one whose rows do not match `names`."""
    import numpy as np

    try:
        found = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # not an .npy, a truncated one
        raise Unreadable(path, f"not resamples: {type(e).__name__}") from None
    if found.ndim != 2 or len(found) != len(names):
        raise Unreadable(path, f"{found.shape} resamples for {len(names)} metrics")
    return {name: row.astype(np.float64) for name, row in zip(names, found, strict=True)}


def write_npz(path: Path, arrays: dict[str, Any]) -> None:
    """{name: numpy array} as one .npz, written atomically."""
    import numpy as np

    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)
