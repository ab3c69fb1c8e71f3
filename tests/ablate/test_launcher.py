"""Launch mechanics: executors from the launcher section, the checkpointable job, arrays, sbatch parameters."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import standin
import submitit

from ablate.errors import UserError
from ablate.running import jobs as arm_jobs
from ablate.running import launch
from ablate.running.store import observe, plan, prepare
from ablate.sweep.expand import RunSpec, config_hash
from ablate.sweep.schema import Launcher

cloudpickle.register_pickle_by_value(standin)  # local-executor jobs cannot import the tests folder


def run_dirs(root: Path, n: int, executor: str) -> list[Path]:
    specs = []
    for i in range(n):
        config = {"seed": 0, "i": i}
        specs.append(RunSpec(f"a{i}-s0", f"a{i}", 0, {}, config, config_hash(config)))
    return prepare(plan(specs, root), root, "t", executor)


def test_job_is_checkpointable_and_requeues_with_the_same_run_dir():
    job = arm_jobs.RunArm()
    assert isinstance(job, submitit.helpers.Checkpointable)
    delayed = job.checkpoint("/runs/t/x-s0")
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == ("/runs/t/x-s0",) and delayed.kwargs == {}


def test_job_calls_the_trainer_entry_point(monkeypatch):
    import trainer.job

    calls = []
    monkeypatch.setattr(trainer.job, "run", lambda run_dir, preemption=None: calls.append(run_dir))
    arm_jobs.RunArm()("/runs/t/x-s0")
    assert calls == ["/runs/t/x-s0"]


def full_launcher(**overrides) -> Launcher:
    fields = dict(
        executor="slurm",
        nodes=2,
        gpus_per_node=8,
        tasks_per_node=8,
        cpus_per_task=12,
        mem_gb=480,
        time_limit_min=240,
        partition="gpu",
        account="vision",
        qos="high",
        constraint="h100",
        array_parallelism=2,
        additional_parameters={"mail-type": "END", "exclusive": True},
        setup=["module load cuda/12.4", "source .venv/bin/activate"],
    )
    return Launcher(**{**fields, **overrides})


def sbatch_flags(text: str) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    for key, value in re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, flags=re.M):
        flags[key] = value or True
    return flags


def test_sbatch_parameters_of_an_array(tmp_path):
    text = launch.sbatch_text(full_launcher(), tmp_path, "prx", n_arms=5)
    flags = sbatch_flags(text)
    folder = tmp_path / ".submitit" / "%A_%a"
    assert flags == {
        "account": "vision",
        "array": "0-4%2",  # 5 arms, at most 2 at once
        "constraint": "h100",
        "cpus-per-task": "12",
        "error": f"{folder}/%A_%a_0_log.err",
        "exclusive": True,
        "gpus-per-node": "8",
        "job-name": "prx",
        "mail-type": "END",
        "mem": "480GB",
        "nodes": "2",
        "ntasks-per-node": "8",
        "open-mode": "append",
        "output": f"{folder}/%A_%a_0_log.out",
        "partition": "gpu",
        "qos": "high",
        "signal": "USR2@90",  # submitit's preemption/timeout signal: checkpoint, requeue
        "time": "240",
        "wckey": "submitit",
    }
    assert "module load cuda/12.4\nsource .venv/bin/activate\n" in text
    assert re.search(r"^srun --unbuffered --output .* -u -m submitit\.core\._submit ", text, flags=re.M)


def test_sbatch_parameters_single_arm_and_defaults(tmp_path):
    launcher = Launcher(executor="slurm", mem_gb=7.5)
    flags = sbatch_flags(launch.sbatch_text(launcher, tmp_path, "t", n_arms=1))
    assert "array" not in flags and "partition" not in flags and "gpus-per-node" not in flags
    assert flags["mem"] == "7680MB" and flags["time"] == "60" and flags["nodes"] == "1"
    assert flags["ntasks-per-node"] == "1" and flags["output"] == f"{tmp_path}/.submitit/%j/%j_0_log.out"
    many = sbatch_flags(launch.sbatch_text(launcher, tmp_path, "t", n_arms=300))
    assert many["array"] == "0-299%256"  # submitit's default throttle when array_parallelism is unset


def test_slurm_executor_needs_srun(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun here
    with pytest.raises(UserError, match="needs `srun` on PATH"):
        launch.build_executor(full_launcher(), tmp_path, "t")


def test_local_executor_gets_the_time_limit_and_setup(tmp_path):
    launcher = Launcher(executor="local", time_limit_min=45, tasks_per_node=2, setup=["export A=1"])
    executor = launch.build_executor(launcher, tmp_path, "t")
    assert isinstance(executor, submitit.LocalExecutor)
    assert executor.parameters == {
        "timeout_min": 45,
        "tasks_per_node": 2,
        "gpus_per_node": 0,
        "setup": ["export A=1"],
    }
    assert str(executor.folder) == f"{tmp_path}/.submitit/%j"


def test_debug_array_records_each_job_then_runs_in_process(tmp_path):
    dirs = run_dirs(tmp_path, 2, "debug")
    executor = launch.build_executor(Launcher(executor="debug"), tmp_path, "t")
    jobs = arm_jobs.submit(executor, dirs, fn=standin.RecordTimes())
    for run_dir, job in zip(dirs, jobs, strict=True):
        recorded = json.loads((run_dir / "job.json").read_text())
        assert recorded["job_id"] == job.job_id and recorded["executor"] == "debug"
        assert observe(run_dir).state == "submitted"  # owned by this live process
        assert not (run_dir / "ran.json").exists()  # debug jobs run when waited for
    arm_jobs.wait(jobs)
    assert all((d / "ran.json").exists() for d in dirs)


def test_failed_debug_job_runs_once_and_does_not_stop_the_others(tmp_path):
    dirs = run_dirs(tmp_path, 2, "debug")
    executor = submitit.DebugExecutor(tmp_path / ".submitit" / "%j")
    failing = arm_jobs.submit(executor, dirs[:1], fn=standin.Fails())
    fine = arm_jobs.submit(executor, dirs[1:], fn=standin.RecordTimes())
    arm_jobs.wait(failing + fine)
    assert (dirs[0] / "calls").read_text() == "1"
    assert (dirs[1] / "ran.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="local executor process checks use /proc")
def test_local_executor_keeps_at_most_parallelism_arms_running(tmp_path):
    dirs = run_dirs(tmp_path, 3, "local")
    executor = launch.build_executor(Launcher(executor="local", time_limit_min=5), tmp_path, "t")
    jobs = arm_jobs.submit(executor, dirs, parallelism=2, fn=standin.RecordTimes(0.5), poll_s=0.05)
    arm_jobs.wait(jobs, poll_s=0.05)
    spans = [json.loads((d / "ran.json").read_text()) for d in dirs]
    events = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2  # the first two ran together, the third waited for a free slot
    assert spans[2]["start"] >= min(spans[0]["end"], spans[1]["end"])
    ids = [json.loads((d / "job.json").read_text())["job_id"] for d in dirs]
    assert ids == [job.job_id for job in jobs] and len(set(ids)) == 3
    assert all(observe(d).state == "stale" for d in dirs)  # the stand-in writes no status; its job is over


def test_two_nodes_of_eight_gpus_one_sbatch_file_and_what_each_task_sees(tmp_path):
    """The study's arm shape: one job of 2 nodes x 8 GPUs, 16 ranks, one log per rank."""
    launcher = Launcher(executor="slurm", nodes=2, gpus_per_node=8, tasks_per_node=8, cpus_per_task=12)
    text = launch.sbatch_text(launcher, tmp_path, "prx", n_arms=1)
    flags = sbatch_flags(text)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"], flags["cpus-per-task"]) == (
        "2",
        "8",
        "8",
        "12",
    )
    assert f"--output {tmp_path}/.submitit/%j/%j_%t_log.out" in text  # %t: one log file per rank

    def task(procid: int, localid: int, node: int) -> dict[str, str]:
        env = {
            "PATH": os.environ["PATH"], "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242",
            "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]",
            "SLURM_NODEID": str(node), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
        }  # fmt: skip
        code = (
            "import json, os\nfrom trainer.runtime import dist\ndist._export_submitit_env()\n"
            "print(json.dumps({k: os.environ[k] for k in "
            "('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    first, eleventh = task(0, 0, 0), task(11, 3, 1)
    assert {k: eleventh[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")} == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
    }  # fmt: skip
    assert eleventh["MASTER_ADDR"] == first["MASTER_ADDR"] == "gpu017"  # rendezvous on the first node
    assert eleventh["MASTER_PORT"] == first["MASTER_PORT"]  # from the job id: the same for every task
    from trainer.runtime.dist import gpu_of

    assert gpu_of(3, 8) == 3  # rank 11 drives GPU 3 of its node
