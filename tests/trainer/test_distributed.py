"""Two CPU processes (gloo) through submitit's local executor match one process."""

import json

import pytest
import submitit
from trainer_testing import metrics_by_step

from trainer import job


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_for_the_same_global_batch(make_run, tmp_path):
    # 9 prompts: rank 0 samples 5 and rank 1 samples 4; the metrics must not depend on the split
    cfg = dict(
        train={"steps": 12, "batch_size": 8, "threads": 1},
        log={"every": 2},
        eval={
            "every": 6,
            "metrics": ["domain_fd", "prompt_adherence"],
            "samples": 9,
            "sample_steps": 4,
            "grid": 4,  # fewer than a process's share: each sends only its prompts among the first 4
        },
    )
    one, two = make_run("one", **cfg), make_run("two", **cfg)
    job.run(one)

    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, timeout_min=5)
    j = executor.submit(job.run, str(two))
    j.results()  # raises with the job's traceback if a task failed
    status = json.loads((two / "status.json").read_text())
    assert status["state"] == "done" and status["world_size"] == 2

    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    print("1 process:", a, "\n2 processes:", b)
    assert b == pytest.approx(a, rel=1e-3)  # same data, noise and t; only reduction order differs
    va, vb = metrics_by_step(one), metrics_by_step(two)
    for metric in ("val_loss", "domain_fd", "prompt_adherence"):
        assert vb[12][metric] == pytest.approx(va[12][metric], rel=1e-3, abs=1e-3), metric
    for run in (one, two):
        assert json.loads((run / "eval" / "step_12.json").read_text())["generated_samples"] == 9
        assert (run / "eval" / "step_12.png").exists()
