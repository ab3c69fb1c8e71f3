"""Pretrained weights: what a component needs, whether it is on this machine, and how to fetch it.

One description serves the trainer (text encoders, autoencoders, REPA teachers), `eval/` (the
metrics' feature extractors) and `ablate weights check|download`, which lists a whole sweep's.

- `HFWeights`: a model on the Hugging Face Hub (a repo, or one subfolder of it). A weights folder
  `D` is an HF cache (`cache_dir=D`: `D/models--org--name/...`); with none, the default HF cache.
  `HFModelFile`: the same, fetching only the config and one weights file.
- `URLWeights`: one file fetched from a URL into the weights folder (clean-fid's Inception).
- `TrainedWeights`: produced by this project's own code (the demo's attribute net), never fetched.

Loading never touches the network (`load_pretrained` passes `local_files_only=True`): a missing
weight is a one-line `MissingWeightsError` naming it, where it was looked for, and the command
that fetches it. Imports neither torch nor transformers.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from core.atomic import atomic_path, atomic_write

DOWNLOAD_COMMAND = "ablate weights download SWEEP"  # SWEEP: the sweep file whose arms need the weights
LOCAL_REVISION = "0" * 40  # the snapshot name `install` uses (the cache layout wants a commit-like name)


class MissingWeightsError(RuntimeError):
    """A weight is not on this machine. The message is one line: what is missing, where it was
    looked for, and the command that fetches it."""


def download_hint(weights_dir: str | Path | None) -> str:
    return f"{DOWNLOAD_COMMAND} --dir {weights_dir}" if weights_dir is not None else DOWNLOAD_COMMAND


def _where(weights_dir: str | Path | None) -> str:
    return f"weights folder {weights_dir}" if weights_dir is not None else "the Hugging Face cache"


class HFWeights(NamedTuple):
    """A model on the Hugging Face Hub, a repo or one subfolder of it (e.g. a pipeline's `vae`).

    Its identity is (repo, subfolder); what is fetched is the class's: the config and the small
    files beside it (EXTRA_FILES: configs, tokenizer files) and one weights file (WEIGHT_FILES,
    alternatives tried in order: the first the repo has is fetched, never two).
    """

    repo_id: str
    subfolder: str | None = None

    WEIGHT_FILES = ("*.safetensors",)
    EXTRA_FILES = ("*.json", "*.model", "*.txt")
    downloadable = True

    def __str__(self) -> str:
        return self.repo_id if self.subfolder is None else f"{self.repo_id} (subfolder {self.subfolder})"

    def key(self, weights_dir: str | Path | None) -> tuple[Any, ...]:
        """Two specs with one key are one weight in one place (one row of `ablate weights`)."""
        return ("hf", self.repo_id, self.subfolder, None if weights_dir is None else str(weights_dir))

    def location(self, weights_dir: str | Path | None) -> str:
        from huggingface_hub import constants

        return str(weights_dir) if weights_dir is not None else f"HF cache ({constants.HF_HUB_CACHE})"

    def _in_folder(self, pattern: str) -> str:
        return pattern if self.subfolder is None else f"{self.subfolder}/{pattern}"

    def missing(self, weights_dir: str | Path | None = None) -> str | None:
        """None when the config and a weights file are in the cache, else one line on what is missing where."""
        from huggingface_hub import try_to_load_from_cache

        cache_dir = None if weights_dir is None else str(weights_dir)
        config = try_to_load_from_cache(self.repo_id, self._in_folder("config.json"), cache_dir=cache_dir)
        if not isinstance(config, str):
            return f"{self} not in {_where(weights_dir)}"
        folder = Path(config).parent
        if not any(any(folder.glob(pattern)) for pattern in self.WEIGHT_FILES):
            return f"{self} has a config but no {' or '.join(self.WEIGHT_FILES)} weights in {_where(weights_dir)}"
        return None

    def download(self, weights_dir: str | Path | None = None) -> None:
        """Fetch the config, the small files and the first weights file the repo has (needs network)."""
        from huggingface_hub import snapshot_download

        cache_dir = None if weights_dir is None else str(weights_dir)
        for weight_file in self.WEIGHT_FILES:
            patterns = [self._in_folder(p) for p in (*self.EXTRA_FILES, weight_file)]
            snapshot_download(self.repo_id, cache_dir=cache_dir, allow_patterns=patterns)
            if self.missing(weights_dir) is None:
                return
        raise RuntimeError(f"{self} has none of {', '.join(self.WEIGHT_FILES)}; cannot fetch its weights")


class HFModelFile(HFWeights):
    """A model fetched as its config.json and one weights file, safetensors preferred (some repos,
    such as CLIP's, have only pytorch_model.bin)."""

    __slots__ = ()
    WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
    EXTRA_FILES = ("config.json",)


@dataclass(frozen=True)
class URLWeights:
    """A single file fetched from a URL into the weights folder."""

    filename: str
    url: str
    default_dir: str  # where the file is looked for when no weights folder is configured
    downloadable = True

    def __str__(self) -> str:
        return self.filename

    def key(self, weights_dir: str | Path | None) -> tuple[Any, ...]:
        return ("file", str(self.path(weights_dir)))

    def location(self, weights_dir: str | Path | None) -> str:
        return str(self.path(weights_dir).parent)

    def path(self, weights_dir: str | Path | None) -> Path:
        return Path(weights_dir if weights_dir is not None else self.default_dir) / self.filename

    def missing(self, weights_dir: str | Path | None = None) -> str | None:
        path = self.path(weights_dir)
        return None if path.is_file() else f"{self.filename} (from {self.url}) not at {path}"

    def download(self, weights_dir: str | Path | None = None) -> None:
        path = self.path(weights_dir)
        if path.is_file():
            return
        with atomic_path(path) as tmp, urllib.request.urlopen(self.url) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)


@dataclass(frozen=True)
class TrainedWeights:
    """Weights this project trains itself (the demo domain's attribute net): listed, never fetched."""

    pattern: str  # file glob inside the folder that holds it
    how: str  # one line: what produces the file
    downloadable = False

    def __str__(self) -> str:
        return self.pattern

    def key(self, weights_dir: str | Path | None) -> tuple[Any, ...]:
        return ("trained", self.pattern, None if weights_dir is None else str(weights_dir))

    def location(self, weights_dir: str | Path | None) -> str:
        return str(weights_dir)

    def missing(self, weights_dir: str | Path | None = None) -> str | None:
        if weights_dir is not None and any(Path(weights_dir).glob(self.pattern)):
            return None
        return f"{self.pattern} ({self.how}) not in weights folder {weights_dir}"

    def download(self, weights_dir: str | Path | None = None) -> None:
        raise NotImplementedError(f"{self.pattern} is trained, not downloaded: {self.how}")


Weights = HFWeights | URLWeights | TrainedWeights


def require(spec: Weights, weights_dir: str | Path | None = None, *, needed_by: str | None = None) -> None:
    """Raise `MissingWeightsError` (one line) unless `spec` is present."""
    problem = spec.missing(weights_dir)
    if problem is None:
        return
    who = f"{needed_by} needs " if needed_by else ""
    how = (
        f"fetch it on a machine with network: {download_hint(weights_dir)}"
        if spec.downloadable
        else f"produce it with: {download_hint(weights_dir)} ({spec.how})"  # type: ignore[union-attr]
    )
    raise MissingWeightsError(f"{who}{problem}; {how}")


def load_pretrained(
    cls: Any,
    spec: HFWeights,
    weights_dir: str | Path | None = None,
    *,
    needed_by: str | None = None,
    **kwargs: Any,
) -> Any:
    """`cls.from_pretrained` (diffusers or transformers) from the local cache only.

    Raises `MissingWeightsError` before loading when the files are absent, so a real loading
    error (a corrupt file, a class that does not fit the checkpoint) is never disguised as one.
    """
    require(spec, weights_dir, needed_by=needed_by)
    if spec.subfolder is not None:
        kwargs["subfolder"] = spec.subfolder
    cache_dir = None if weights_dir is None else str(weights_dir)
    return cls.from_pretrained(spec.repo_id, cache_dir=cache_dir, local_files_only=True, **kwargs)


def required(cfg: Any) -> list[HFWeights]:
    """Every pretrained model a config needs: the `weights()` of each sub-config, depth first, once each."""
    found: list[HFWeights] = []

    def walk(node: Any) -> None:
        if callable(getattr(node, "weights", None)):
            found.extend(w for w in node.weights() if w not in found)
        for name in getattr(type(node), "model_fields", {}):
            value = getattr(node, name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(type(item), "model_fields"):
                    walk(item)

    walk(cfg)
    return found


def install(spec: HFWeights, source: str | Path, weights_dir: str | Path) -> Path:
    """Copy a local model folder (a `save_pretrained` output) into a weights folder as `spec`.

    For machines with no network, and for tests: afterwards `load_pretrained` finds it exactly as if
    it had been downloaded. The snapshot is recorded under a fixed local revision that `main` points to.
    """
    repo = Path(weights_dir) / f"models--{spec.repo_id.replace('/', '--')}"
    target = repo / "snapshots" / LOCAL_REVISION
    if spec.subfolder is not None:
        target = target / spec.subfolder
    shutil.copytree(source, target, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    atomic_write(repo / "refs" / "main", LOCAL_REVISION)
    return target
