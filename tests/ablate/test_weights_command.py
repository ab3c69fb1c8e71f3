"""`ablate weights check|download`: every weight a sweep needs, once, in the right folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from ablate_testing import SWEEP

import core.weights
from core.weights import HFWeights, install

# Denoiser side: the FLUX.1 VAE (one delta) and the DINOv2 REPA teacher (one delta); eval side:
# Inception (fid), DINOv2 (dino_mmd; the same repository as the teacher) and the demo's
# attribute net, which the trainer trains itself. Two seeds: every weight still listed once.
WEIGHTS_SWEEP = SWEEP.replace(
    "  eval: {every: 2, batch_size: 8}",
    "  eval: {every: 2, batch_size: 8, metrics: [fid, dino_mmd, domain_fd, prompt_adherence]}",
).replace(
    "seeds: [0]",
    "  vae:\n    tokenizer: {kind: flux-vae}\n"
    "  repa:\n    repa: {kind: repa, teacher: {kind: dinov2-vitl14-reg}, block: 1}\n"
    "seeds: [0, 1]",
)
VAE, DINO = "black-forest-labs/FLUX.1-dev", "facebook/dinov2-with-registers-large"
INCEPTION = "inception-2015-12-05.pt"


def rows(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            found[cells[0]] = line
    return found


def put_hf(folder: Path, repo_id: str, subfolder: str | None = None) -> None:
    """A model in the weights folder's HF cache layout (file contents do not matter to the checks)."""
    source = folder.parent / "src" / repo_id / (subfolder or "")
    source.mkdir(parents=True, exist_ok=True)
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_bytes(b"")
    install(HFWeights(repo_id, subfolder), source, folder)


def test_check_lists_each_weight_once_and_exits_1_while_any_is_missing(write_sweep, cli, workdir):
    path = write_sweep(WEIGHTS_SWEEP)
    folder = workdir / "w"
    result = cli("weights", "check", path, "--dir", folder)
    assert result.code == 1, result.err
    table = rows(result.out)
    assert set(table) == {INCEPTION, DINO, "domain-attr extractor", f"{VAE} (subfolder vae)"}
    assert "eval: dino_mmd, repa" in table[DINO] and "all" in table[DINO] and "missing" in table[DINO]
    assert "tokenizer" in table[f"{VAE} (subfolder vae)"] and "│ vae " in table[f"{VAE} (subfolder vae)"]
    assert "eval: fid" in table[INCEPTION] and "missing" in table[INCEPTION]
    assert "trained by the trainer on first" in table["domain-attr extractor"]  # not missing
    assert result.out.count("\nmissing: ") == 3
    command = f"ablate weights download {path} --dir {folder}"
    assert f"3 of 4 missing; fetch them with network: {command}" in result.out

    put_hf(folder, VAE, "vae")
    put_hf(folder, DINO)
    (folder / INCEPTION).write_bytes(b"")
    present = cli("weights", "check", path, "--dir", folder)
    assert present.code == 0, present.out
    assert "all present" in present.out and "missing" not in present.out


def test_download_fetches_what_is_missing_into_the_arms_weights_dir(write_sweep, cli, workdir, monkeypatch):
    path = write_sweep(WEIGHTS_SWEEP.replace("baseline:\n", "baseline:\n  weights_dir: wdir\n"))
    put_hf(workdir / "wdir", VAE, "vae")  # already here: not fetched again
    fetched = []

    def fake_hf_download(self, folder):
        fetched.append(("eval", self.repo_id, folder))
        put_hf(Path(folder), self.repo_id)

    def fake_url_download(self, folder):
        fetched.append(("eval", self.filename, folder))
        self.path(folder).write_bytes(b"")

    monkeypatch.setattr(
        core.weights.HFWeights, "download", fake_hf_download
    )  # one description for both sides
    monkeypatch.setattr(core.weights.URLWeights, "download", fake_url_download)
    result = cli("weights", "download", path)
    assert result.code == 0, result.out + result.err
    # DINOv2 once: eval's files (config + model.safetensors) also satisfy the REPA teacher's check
    assert fetched == [("eval", INCEPTION, "wdir"), ("eval", DINO, "wdir")]
    assert f"{VAE} (subfolder vae): present in wdir" in result.out
    assert "domain-attr extractor: trained by the trainer on first use" in result.out
    assert cli("weights", "check", path).code == 0


def test_download_failure_is_one_line_per_weight_not_a_traceback(write_sweep, cli, workdir, monkeypatch):
    path = write_sweep(WEIGHTS_SWEEP)

    def offline(*args):
        raise ConnectionError("HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded\n  detail\n")

    monkeypatch.setattr(core.weights.HFWeights, "download", offline)
    monkeypatch.setattr(core.weights.URLWeights, "download", offline)
    folder = workdir / "w"
    result = cli("weights", "download", path, "--dir", folder)
    assert result.code == 1 and "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 4
    assert lines[0] == (
        f"error: could not fetch {INCEPTION} into {folder}: "
        "ConnectionError: HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded"
    )
    assert lines[-1].startswith("error: 3 of 4 weight(s) not fetched: downloading needs network access")


@pytest.mark.parametrize("args", [["weights", "check"], ["weights", "download"]])
def test_an_invalid_sweep_is_one_line(write_sweep, cli, args):
    result = cli(*args, write_sweep(SWEEP.replace("seeds: [0]", "seed: [0]")))
    assert result.code == 2 and result.err.count("\n") == 1 and "seed: unknown key" in result.err
