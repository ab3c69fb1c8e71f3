"""Pretrained weights the trainer needs: what they are, whether they are here, how to fetch them.

A weights folder `D` is a Hugging Face cache (`cache_dir=D`: `D/models--org--name/...`); with no
folder the default HF cache is used (`HF_HUB_CACHE` / `HF_HOME`). Loading never touches the
network (`local_files_only=True`): a missing model is a one-line `MissingWeightsError` naming it
and the command that fetches it. Every config that needs weights has a `weights()` method
returning `[HFWeights(repo_id, subfolder)]`; `required(cfg)` collects them for a whole config,
so `ablate weights check/download` can enumerate a sweep's weights without loading any.

Imports neither torch nor transformers at module level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from eval.weights import MissingWeightsError, download_hint  # one error type and hint for both packages

# Files a model folder needs: configs, safetensors weights, tokenizer files (sentencepiece, BPE merges).
FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt")


class HFWeights(NamedTuple):
    """A model on the Hugging Face Hub: a repo, or one subfolder of it (e.g. a pipeline's `vae`)."""

    repo_id: str
    subfolder: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.subfolder is None else f"{self.repo_id} (subfolder {self.subfolder})"

    def patterns(self) -> list[str]:
        prefix = "" if self.subfolder is None else f"{self.subfolder}/"
        return [prefix + p for p in FILE_PATTERNS]


def missing(spec: HFWeights, weights_dir: str | Path | None = None) -> str | None:
    """None when `spec`'s config and weights are in the cache, else one line saying what is missing where."""
    from huggingface_hub import try_to_load_from_cache

    config = "config.json" if spec.subfolder is None else f"{spec.subfolder}/config.json"
    found = try_to_load_from_cache(spec.repo_id, config, cache_dir=None if weights_dir is None else str(weights_dir))
    where = f"weights folder {weights_dir}" if weights_dir is not None else "the Hugging Face cache"
    if not isinstance(found, str):
        return f"{spec} not in {where}"
    if not any(Path(found).parent.glob("*.safetensors")):
        return f"{spec} has a config but no *.safetensors weights in {where}"
    return None


def require(spec: HFWeights, weights_dir: str | Path | None = None) -> None:
    problem = missing(spec, weights_dir)
    if problem is not None:
        raise MissingWeightsError(f"{problem}; fetch it on a machine with network: {download_hint(weights_dir)}")


def hf_load(cls: Any, repo_id: str, subfolder: str | None = None, weights_dir: str | Path | None = None,
            **kwargs: Any) -> Any:
    """`cls.from_pretrained` (diffusers or transformers) from the local cache only.

    Raises `MissingWeightsError` before loading when the files are absent, so a real loading
    error (a corrupt file, a class that does not fit the checkpoint) is never disguised as one.
    """
    require(HFWeights(repo_id, subfolder), weights_dir)
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    return cls.from_pretrained(repo_id, cache_dir=None if weights_dir is None else str(weights_dir),
                               local_files_only=True, **kwargs)


def download(spec: HFWeights, weights_dir: str | Path | None = None) -> Path:
    """Fetch `spec`'s files (only its subfolder) into the cache; returns the snapshot folder. Needs network."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(spec.repo_id, cache_dir=None if weights_dir is None else str(weights_dir),
                             allow_patterns=spec.patterns())
    problem = missing(spec, weights_dir)
    if problem is not None:
        raise RuntimeError(f"downloaded {spec} but {problem}: the repo may lack safetensors weights")
    return Path(path)


def required(cfg: Any) -> list[HFWeights]:
    """Every HF model a config needs: the `weights()` of each sub-config, depth first, no duplicates."""
    found: list[HFWeights] = []

    def walk(node: Any) -> None:
        if hasattr(node, "weights") and callable(node.weights):
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

    For machines with no network and for tests: afterwards `hf_load` finds it exactly as if it
    had been downloaded. The snapshot is recorded under a fixed local revision that `main` points to.
    """
    import shutil

    repo = Path(weights_dir) / f"models--{spec.repo_id.replace('/', '--')}"
    revision = LOCAL_REVISION
    target = repo / "snapshots" / revision
    if spec.subfolder is not None:
        target = target / spec.subfolder
    shutil.copytree(source, target, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return target


LOCAL_REVISION = "0" * 40  # the snapshot name `install` uses (the cache layout wants a commit-like name)
