"""Sharded checkpoints: an FSDP arm on several processes saves with torch.distributed.checkpoint (DCP).

checkpoints/step_00000100/
    dcp/.metadata         DCP's index: which file holds which part of which tensor
    dcp/__R_0.distcp      process R's part of the weights (model.prx.…, model.factors.…), of each
                          optimizer's state (optimizer.NAME.state.…, keyed by parameter name) and of
                          the EMA's shadows (ema.shadow.…); a replicated tensor is written once
    state.pt              step, RNG states, data position, timings (the main process's; small)
    transformer/, factors.safetensors
                          at the last step only: the whole weights as a diffusers folder
                          (trainer/runtime/pretrained.py); `ablate export` makes one from any step
    manifest.json         size and XXH3-128 of every file, each DCP file's computed by the process that
                          wrote it (`writer`) while writing it; written last, by the main process

No process gathers the state: each stages its own shards in host memory (all the job waits for), then
writes them in a background thread, every process at once, DCP's collectives running on `Dist.saving`.
Loading reads each process's part of every tensor from whichever files hold it, so a checkpoint saved
at one world size resumes at another, and under another layout (DDP or one process read whole tensors).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from trainer.runtime.checkpoint import load_state
from trainer.runtime.checksum import Hashed

DCP = "dcp"  # the folder of DCP's files inside a checkpoint


def is_sharded(checkpoint: Path) -> bool:
    return (checkpoint / DCP / ".metadata").is_file()


class _HashingFileSystem(FileSystem):
    """DCP's local file system, every file it writes hashed on its way to the disk (`written`: {name in
    the DCP folder: manifest entry}). The metadata is written under a temporary name, then renamed: its
    entry follows it."""

    def __init__(self):
        super().__init__()
        self.written: dict[str, dict] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str) -> Iterator[Any]:
        if mode != "wb":
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with Hashed(Path(path)) as stream:
            yield stream
        self.written[Path(path).name] = stream.entry()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if (entry := self.written.pop(Path(path).name, None)) is not None:
            self.written[Path(new_path).name] = entry


def write(state: dict, checkpoint: Path, group: Any, rank: int) -> dict[str, dict]:
    """This process's part of `state` into `checkpoint`/dcp (every process calls it: collective on
    `group`); returns the manifest entries of the files this process wrote."""
    from torch.distributed.checkpoint import save
    from torch.utils.serialization import config

    # the shards are staged in host memory already: DCP's serial loader, not its GPU-overlapping one, whose
    # stream in this (background) thread would be device 0's and make a CUDA context there per process
    writer = FileSystemWriter(
        checkpoint / DCP, single_file_per_rank=True, sync_files=True, per_thread_copy_ahead=0, overwrite=False
    )
    writer.fs = fs = _HashingFileSystem()
    with config.patch({"save.compute_crc32": False}):  # the manifest's checksum covers every byte
        save(state, storage_writer=writer, process_group=group)
    return {f"{DCP}/{name}": dict(entry, writer=rank) for name, entry in fs.written.items()}


def _dcp_load(state: dict, reader: FileSystemReader, *, alone: bool, group: Any = None) -> None:
    """DCP's load by this process `alone`, or by every process with its collectives on `group`."""
    from torch.distributed.checkpoint import load as dcp_load

    with warnings.catch_warnings():  # one process on purpose, which DCP warns about
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp_load(state, storage_reader=reader, process_group=group, no_dist=alone)


def load(checkpoint: Path, state: dict, dist: Any) -> dict:
    """Read `checkpoint`'s DCP part into `state` (`held_state`'s live tensors: each process's part of
    each, whatever world size wrote them; every process calls it) and return its state.pt. DCP's
    collectives run under the long timeout (`Dist.long`): the processes read at their own pace."""
    _dcp_load(state, FileSystemReader(checkpoint / DCP), alone=dist.world == 1, group=dist.long)
    return load_state(checkpoint)


def read_whole(checkpoint: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose key starts with `prefix` ("model.", "ema.shadow.",
    "optimizer.adamw.state."), whole, in this process's memory, keyed without the prefix; one process,
    no process group (what `ablate export` and a look into a checkpoint need)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(checkpoint / DCP)
    wanted = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)
    }
    if wanted:
        _dcp_load(wanted, reader, alone=True)
    return {key.removeprefix(prefix): value for key, value in wanted.items()}


def read_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A sharded checkpoint whole, in a whole checkpoint's shape: (the denoiser's state dict, {"optimizer":
    {name: {"state": {parameter: {moment: tensor}}}}, "ema": {"shadow": …}} with state.pt's entries)."""
    optimizer: dict = {}
    for key, value in read_whole(checkpoint, "optimizer.").items():
        name, rest = key.split(".", 1)
        if rest.startswith("state."):  # state.<parameter name>.<moment>
            parameter, moment = rest.removeprefix("state.").rsplit(".", 1)
            optimizer.setdefault(name, {"state": {}})["state"].setdefault(parameter, {})[moment] = value
    shadow = read_whole(checkpoint, "ema.shadow.")
    state = load_state(checkpoint)
    return read_whole(checkpoint, "model."), {
        **state,
        "optimizer": optimizer,
        "ema": {"shadow": shadow} if shadow else {},
    }
