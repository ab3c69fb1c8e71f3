import json

import pytest
import torch
import yaml
from diffusers import PRXTransformer2DModel
from safetensors.torch import load_file
from trainer_testing import TINY, crash_at, merge, metrics_by_step

from trainer import job
from trainer.config import TrainConfig
from trainer.runtime import checkpoint
from trainer.runtime.dist import Dist
from trainer.train import Trainer


def weights(run_dir):
    ckpt = checkpoint.latest(run_dir)
    return load_file(ckpt / "transformer" / "diffusion_pytorch_model.safetensors")


def test_run_writes_the_run_directory(make_run):
    d = make_run()
    result = job.run(d)
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "done" and status["step"] == 8 and status["total_steps"] == 8
    assert json.loads((d / "result.json").read_text()) == result.to_json()
    assert "metrics" not in result.to_json()  # the metrics live in eval/ only
    by_step = metrics_by_step(d)
    assert set(by_step) == {4, 8} and by_step[8]["val_loss"] > 0
    assert result.throughput.batches_per_s > 0 and result.throughput.samples_per_s > 0
    log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    assert {"loss", "lr", "grad_norm", "batches_per_s", "data_s", "compute_s", "eta_s"} <= set(log[0])
    assert log[0]["lr"] == pytest.approx(1e-3)  # warm-up done after 2 steps
    assert [p.name for p in checkpoint.complete(d)] == ["step_00000004", "step_00000008"]
    # the checkpoint is a plain diffusers model
    model = PRXTransformer2DModel.from_pretrained(checkpoint.latest(d) / "transformer")
    assert model.config.in_channels == 3 and model.config.context_in_dim == 32


def test_training_reduces_the_loss(make_run):
    d = make_run(train={"steps": 30}, eval={"every": 10})
    job.run(d)
    by_step = metrics_by_step(d)
    assert by_step[30]["val_loss"] < 0.8 * by_step[10]["val_loss"]


def test_interrupted_run_resumes_bitwise_identical(make_run, monkeypatch):
    straight = make_run("straight", train={"steps": 10}, checkpoint={"every": 4, "keep": 5})
    job.run(straight)

    resumed = make_run("resumed", train={"steps": 10}, checkpoint={"every": 4, "keep": 5})
    with crash_at(6), pytest.raises(KeyboardInterrupt):  # killed mid-run, after checkpoint 4
        job.run(resumed)
    assert json.loads((resumed / "status.json").read_text())["state"] == "failed"
    assert checkpoint.latest(resumed).name == "step_00000004"
    assert not (resumed / "result.json").exists()

    job.run(resumed)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(checkpoint.latest(straight) / "state.pt", weights_only=False)
    sb = torch.load(checkpoint.latest(resumed) / "state.pt", weights_only=False)
    for name in sa["optimizer"]["adamw"]["state"]:
        for k, v in sa["optimizer"]["adamw"]["state"][name].items():
            assert torch.equal(v, sb["optimizer"]["adamw"]["state"][name][k])
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log lines from the interrupted part


def test_non_finite_loss_fails_the_arm_naming_the_step(make_run, monkeypatch):
    d = make_run(train={"steps": 8}, checkpoint={"every": 2}, log={"every": 1})
    real_step = Trainer.train_step

    def nan_at_5(self, step, batch):
        loss, gn = real_step(self, step, batch)
        return (loss * float("nan"), gn) if step == 5 else (loss, gn)

    monkeypatch.setattr(Trainer, "train_step", nan_at_5)
    with pytest.raises(RuntimeError, match="step 5"):
        job.run(d)
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "failed" and "step 5" in status["error"]
    assert checkpoint.latest(d).name == "step_00000004"  # the last good one is kept
    assert not (d / "result.json").exists()


def test_bad_config_fails_before_training(make_run):
    d = make_run()
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["optimizer"]["lrr"] = 1
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception, match="lrr"):
        job.run(d)


def test_rescoring_a_checkpoint_updates_the_result(make_run):
    d = make_run(checkpoint={"every": 4, "keep": 5})
    job.run(d)
    trained = metrics_by_step(d)[4]
    (d / "eval" / "step_4.json").unlink()
    metrics = job.rescore(d, step=4)
    assert metrics == pytest.approx(trained)  # same weights, same fixed noise
    assert json.loads((d / "eval" / "step_4.json").read_text())["metrics"] == metrics
    with pytest.raises(FileNotFoundError, match="checkpoints kept: 4, 8"):
        job.rescore(d, step=6)


def test_wandb_run_is_named_grouped_and_resumed_under_one_id(make_run, monkeypatch):
    """A requeued arm logs into the same W&B run (a deterministic id), not a new one."""
    import wandb

    seen = []
    real_init = wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.append(kw) or real_init(**kw))
    d = make_run(log={"every": 2, "wandb": {"mode": "offline", "project": "ablate-test"}})
    (d / "spec.json").write_text(
        json.dumps({"name": "muon-s0", "sweep": "demo", "delta": "muon", "hash": "abc"})
    )
    job.run(d)
    (d / "result.json").unlink()
    import shutil

    shutil.rmtree(checkpoint.latest(d))
    (first,) = (d / "wandb").glob("offline-run-*")  # resumed in the same second: keep the folders apart
    first.rename(first.with_name(first.name.replace("offline-run-", "offline-run-0-")))
    job.run(d)  # resumes from step 4
    assert [s["id"] for s in seen] == [seen[0]["id"]] * 2 and seen[0]["resume"] == "allow"
    assert (seen[0]["name"], seen[0]["group"], seen[0]["job_type"]) == ("muon-s0", "demo", "train")
    assert seen[0]["config"]["optimizer"]["kind"] == "adamw"  # the resolved config
    runs = sorted((d / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(seen[0]["id"]) for r in runs)


def test_time_limit_signal_saves_a_checkpoint_then_hands_over_to_submitit(make_run, monkeypatch):
    """SIGUSR2 mid-run (submitit: time almost up) → checkpoint at the next log point → submitit's
    handler requeues; the requeued job resumes from that checkpoint and ends like a straight run."""
    import os
    import signal

    straight = make_run(
        "straight", train={"steps": 10}, checkpoint={"every": 100, "keep": 5}, log={"every": 2}
    )
    job.run(straight)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    requeued = []
    d = make_run("preempted", train={"steps": 10}, checkpoint={"every": 100, "keep": 5}, log={"every": 2})

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint_and_try_requeue
        # the requeued job may start at once: the checkpoint is whole on disk before it is requeued
        requeued.append((signum, checkpoint.verify(d / "checkpoints" / "step_00000006")))
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    real_step = Trainer.train_step

    def signal_at_5(self, step, batch):
        if step == 5:
            os.kill(os.getpid(), signal.SIGUSR2)
        return real_step(self, step, batch)

    try:
        monkeypatch.setattr(Trainer, "train_step", signal_at_5)
        with pytest.raises(SystemExit):
            job.run(d)
        assert requeued == [(signal.SIGUSR2, None)]
        assert checkpoint.latest(d).name == "step_00000006"  # saved at the next log point
        assert json.loads((d / "status.json").read_text())["state"] == "submitted"  # in flight, not failed
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back

        monkeypatch.setattr(Trainer, "train_step", real_step)
        job.run(d)  # the requeued job
    finally:
        signal.signal(signal.SIGUSR2, previous)
    a, b = weights(straight), weights(d)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_eval_step_keeps_its_eval_noise_and_so_does_a_rescore(make_run, domain_cache):
    """The metrics on prompt resamples (the same draws for every arm) and what they came from, beside the
    record, at the last step and at `ablate eval`; other steps keep the record alone (bounded in size)."""
    import numpy as np

    from core.rundir import RunDir
    from eval.distances import mean_resamples, resample_counts

    eval_cfg = {"metrics": ["domain_fd", "prompt_adherence"], "samples": 8, "sample_steps": 2,
                "cache_dir": str(domain_cache), "resamples": 50}  # fmt: skip
    d = make_run(eval=eval_cfg, checkpoint={"every": 4, "keep": 5})
    job.run(d)
    run = RunDir(d)
    last, middle = run.eval_records()[8], run.eval_records()[4]
    assert middle.resampled == [] and not run.eval_resamples(4).exists()
    assert sorted(last.resampled) == ["domain_fd", "prompt_adherence", "val_loss"]
    resamples = run.read_resamples(last)
    assert all(r.shape == (50,) and np.isfinite(r).all() for r in resamples.values())
    with np.load(run.eval_items(8)) as items:
        assert items["features/domain-attr"].dtype == np.float16 and len(items["features/domain-attr"]) == 8
        per_row = items["scores/val_loss"]
        assert per_row.mean() == pytest.approx(last.metrics["val_loss"])  # the rows behind the value
    assert resamples["val_loss"] == pytest.approx(mean_resamples(per_row, resample_counts(len(per_row), 50)))
    job.rescore(d, step=4)
    assert sorted(run.eval_records()[4].resampled) == sorted(last.resampled)


def test_generation_reads_prompts_without_decoding_an_image(tmp_path, domain_cache):
    # the prompts' captions and attributes come from `prompts`; images are decoded only for the reference
    ev = {"metrics": ["domain_fd", "prompt_adherence"], "samples": 6, "sample_steps": 2,
          "cache_dir": str(domain_cache)}  # fmt: skip
    tr = Trainer(
        TrainConfig.model_validate(merge(TINY, {"eval": ev})), tmp_path, Dist(0, 1, 0, torch.device("cpu"))
    )
    generation = tr.evaluation.generation
    first, *_ = generation(tr.sampler)  # computes (and caches) the reference from the held-out images

    class PromptsOnly:  # what sampling may touch: no __getitem__, so an image decode would raise
        def __init__(self, base):
            self.prompts, self.n = base.prompts, len(base)

        def __len__(self):
            return self.n

    generation.rows = PromptsOnly(generation.rows)
    again, *_ = generation(tr.sampler)
    assert again == first and set(again) == {"domain_fd", "prompt_adherence"}
