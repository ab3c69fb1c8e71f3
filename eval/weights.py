"""What weights each extractor needs, whether they are present, and how to fetch them.

Imports neither torch nor transformers, so `ablate weights check` stays instant.

A weights folder (`--dir D`) holds Hugging Face models in the HF cache layout (`D/models--org--name/...`,
i.e. `cache_dir=D`) and plain files (clean-fid's Inception) at `D/<file>`. With no folder, HF models
come from the default HF cache and the Inception file from clean-fid's own download folder.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from eval.atomic import atomic_path

DOWNLOAD_COMMAND = "ablate weights download SWEEP"  # SWEEP: the sweep file whose arms need the weights


class MissingWeightsError(RuntimeError):
    """A weight file is not on this machine. The message is one line: what is missing, where it
    was looked for, and the command that fetches it."""


def download_hint(weights_dir: str | Path | None) -> str:
    return f"{DOWNLOAD_COMMAND} --dir {weights_dir}" if weights_dir is not None else DOWNLOAD_COMMAND


@dataclass(frozen=True)
class HFWeights:
    """A Hugging Face model repo: its config plus one weights file (safetensors preferred)."""

    repo_id: str
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")  # any one suffices
    downloadable = True  # class constant (no annotation, so not a dataclass field)

    def describe(self) -> str:
        return f"{self.repo_id} (config.json + {' or '.join(self.weight_files)}, Hugging Face)"

    def missing(self, weights_dir: str | Path | None) -> str | None:
        """None when present, else a one-line description of what is missing and where."""
        from huggingface_hub import try_to_load_from_cache

        cache_dir = str(weights_dir) if weights_dir is not None else None

        def cached(name: str) -> bool:
            return isinstance(try_to_load_from_cache(self.repo_id, name, cache_dir=cache_dir), str)

        if cached("config.json") and any(cached(f) for f in self.weight_files):
            return None
        where = f"weights folder {weights_dir}" if weights_dir is not None else "the Hugging Face cache"
        return f"{self.describe()} not in {where}"

    def hint(self, weights_dir: str | Path | None) -> str:
        return f"fetch it on a machine with network: {download_hint(weights_dir)}"

    def download(self, weights_dir: str | Path | None) -> None:
        from huggingface_hub import snapshot_download

        cache_dir = str(weights_dir) if weights_dir is not None else None
        for weight_file in self.weight_files:  # first format the repo has wins; never both
            snapshot_download(self.repo_id, cache_dir=cache_dir, allow_patterns=["config.json", weight_file])
            if self.missing(weights_dir) is None:
                return
        raise RuntimeError(f"{self.repo_id} has none of {self.weight_files}; cannot fetch its weights")


@dataclass(frozen=True)
class URLWeights:
    """A single file fetched from a URL into the weights folder."""

    filename: str
    url: str
    default_dir: str  # where the file is looked for when no weights folder is configured
    downloadable = True

    def describe(self) -> str:
        return f"{self.filename} (from {self.url})"

    def path(self, weights_dir: str | Path | None) -> Path:
        return Path(weights_dir if weights_dir is not None else self.default_dir) / self.filename

    def missing(self, weights_dir: str | Path | None) -> str | None:
        path = self.path(weights_dir)
        return None if path.is_file() else f"{self.describe()} not at {path}"

    def hint(self, weights_dir: str | Path | None) -> str:
        return f"fetch it on a machine with network: {download_hint(weights_dir)}"

    def download(self, weights_dir: str | Path | None) -> None:
        path = self.path(weights_dir)
        if path.is_file():
            return
        with atomic_path(path) as tmp, urllib.request.urlopen(self.url) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)


@dataclass(frozen=True)
class TrainedWeights:
    """Weights produced by training in this repo (the demo domain's attribute net), not downloaded."""

    pattern: str  # file glob inside the weights folder
    how: str  # one line: what produces the file
    downloadable = False

    def describe(self) -> str:
        return f"{self.pattern} ({self.how})"

    def missing(self, weights_dir: str | Path | None) -> str | None:
        if weights_dir is not None and any(Path(weights_dir).glob(self.pattern)):
            return None
        return f"{self.describe()} not in weights folder {weights_dir}"

    def hint(self, weights_dir: str | Path | None) -> str:
        return f"produce it with: {download_hint(weights_dir)} ({self.how})"

    def download(self, weights_dir: str | Path | None) -> None:
        raise NotImplementedError(f"{self.pattern} is trained, not downloaded: {self.how}")


WeightSpec = HFWeights | URLWeights | TrainedWeights


def require(name: str, spec: WeightSpec, weights_dir: str | Path | None) -> None:
    """Raises `MissingWeightsError` (one line) when `spec` is not present."""
    problem = spec.missing(weights_dir)
    if problem is not None:
        raise MissingWeightsError(f"extractor '{name}' needs {problem}; {spec.hint(weights_dir)}")
