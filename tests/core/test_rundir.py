"""The run directory contract: states and their transitions, typed records, the one source of per-step
metrics, tolerant readers."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from core.atomic import Unreadable
from core.records import EvalRecord, LogRow, Result, Status, Throughput
from core.rundir import DONE, FAILED, QUEUED, RUNNING, STATES, SUBMITTED, TRANSITIONS, RunDir


def test_every_state_has_its_transitions_and_done_only_follows_running(tmp_path):
    assert set(TRANSITIONS) == {None, *STATES}
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    with pytest.raises(ValueError, match="state None cannot become 'done'"):
        run.set_status(DONE)
    run.set_status(QUEUED, job_id=None)
    assert not run.set_status(SUBMITTED, only_from=(RUNNING,))  # not running: left alone
    run.set_status(SUBMITTED, only_from=(QUEUED,), job_id="7")
    with pytest.raises(ValueError, match="'submitted' cannot become 'done'"):
        run.set_status(DONE)
    run.set_status(RUNNING, step=3, loss=0.5)
    run.set_status(RUNNING, step=4)  # fields not given are kept
    assert run.read_status().loss == 0.5 and run.read_status().job_id == "7"
    run.set_status(DONE)
    run.set_status(QUEUED, fresh=True)  # a re-queued arm starts a clean record
    fresh = run.read_status()
    assert fresh.state == QUEUED and fresh.model_copy(update={"state": None, "updated_at": None}) == Status()
    with pytest.raises(TypeError, match="Status has no field stepp"):  # a misspelt field is a bug, not data
        run.set_status(RUNNING, stepp=5)


def test_per_step_metrics_come_from_eval_files_only(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.write_eval(EvalRecord(step=10, metrics={"val_loss": 2.0}, val_samples=8))
    run.write_eval(EvalRecord(step=2, metrics={"val_loss": 3.0}))
    assert run.metrics_by_step() == {2: {"val_loss": 3.0}, 10: {"val_loss": 2.0}}
    run.write_result(Result(step=10, throughput=Throughput(batches_per_s=2.0)))
    assert "metrics" not in json.loads(run.result.read_text())  # no second copy to keep in step
    run.write_eval(
        EvalRecord(step=10, metrics={"val_loss": 1.5, "fid": 9.0})
    )  # `ablate eval` scores it again
    assert run.metrics_by_step()[10] == {"val_loss": 1.5, "fid": 9.0}
    # a result.json from before still reads: fields a record does not know are ignored
    run.result.write_text(json.dumps({"step": 10, "throughput": {}, "metrics": {"val_loss": 2.0}}))
    assert run.read_result() == Result(step=10)


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("status.json", {"state": 3}, "field 'state' is a number"),
        ("status.json", {"state": "running", "step": "4"}, "field 'step' is a string"),
        ("status.json", {"state": "running", "loss": True}, "field 'loss' is a boolean"),
        ("status.json", ["running"], "a JSON list, not an object"),
        ("job.json", {"job_id": ["1"]}, "field 'job_id' is a list"),
        (
            "result.json",
            {"throughput": {"batches_per_s": "fast"}},
            "field 'throughput.batches_per_s' is a string",
        ),
        ("eval/step_4.json", {"step": 4, "metrics": {"fid": "low"}}, "field 'metrics.fid' is a string"),
        ("eval/step_4.json", {"step": 4}, "field 'metrics' is missing"),
    ],
)
def test_a_record_of_the_wrong_shape_reads_as_unreadable_naming_the_file_and_field(
    tmp_path, file, content, problem
):
    run = RunDir(tmp_path / "a-s0")
    (run.path / file).parent.mkdir(parents=True)
    (run.path / file).write_text(json.dumps(content))
    read = {"status.json": run.read_status, "job.json": run.read_job, "result.json": run.read_result}
    with pytest.raises(Unreadable, match=f"^{run.path / file}: unreadable \\({problem}"):
        read.get(file, run.eval_records)()


def test_a_job_id_written_as_a_number_reads_as_the_scheduler_s_string(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    run.job.write_text(json.dumps({"executor": "slurm", "job_id": 123}))
    assert run.read_job().job_id == "123"


def test_a_torn_last_log_line_is_skipped_and_truncation_keeps_whole_lines(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    for step in (1, 2, 3):
        run.append_log(LogRow(step=step, loss=1.0 / step))
    with run.log.open("a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    assert [r.step for r in run.log_rows()] == [1, 2, 3] and run.last_log_row().step == 3
    run.truncate_log(2)
    assert [json.loads(line)["step"] for line in run.log.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("tail", ["", '{"step": 9, "lo', '{"step": 9, "loss": 0.1}', "\n\n", "garbage\n"])
@pytest.mark.parametrize("step", [0, 3, 5, 8])
def test_truncation_keeps_the_rows_up_to_the_step_and_drops_later_ones_and_a_torn_tail(tmp_path, step, tail):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    for i in range(1, 9):
        run.append_log(LogRow(step=i, loss=1.0 / i))
    with run.log.open("a") as f:
        f.write(tail)  # what a kill mid-write leaves: a torn line, a whole line without its newline, …
    kept = run.log.read_bytes()[: sum(len(line) for line in run.log.read_bytes().splitlines(True)[:step])]

    torn = run.truncate_log(step)

    assert run.log.read_bytes() == kept  # a prefix: the rows up to `step`, byte for byte
    assert [r.step for r in run.log_rows()] == list(range(1, step + 1))
    assert torn == (tail in ('{"step": 9, "lo', "garbage\n"))
    run.append_log(LogRow(step=step + 1, loss=0.5))  # the next row starts a line of its own
    assert [r.step for r in run.log_rows()] == list(range(1, step + 2))


def test_a_row_whose_newline_was_not_written_is_kept_whole(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    run.log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}')
    assert run.truncate_log(2) == 0
    assert run.log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


def test_truncating_a_long_log_reads_only_its_tail(tmp_path):
    """A resume on a long log (the issue's: 477 MB, 4.8 GB peak when it was parsed whole): memory is
    bounded by what is dropped, not by the log's length."""
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    row = LogRow(
        step=0, loss=0.5, lr=1e-4, grad_norm=0.2, batches_per_s=3.9, time="2026-01-01T00:00:00+00:00"
    )
    line = json.dumps(row.to_json()).replace('"step": 0', '"step": STEP') + "\n"
    with run.log.open("w") as f:
        for start in range(1, 200_001, 10_000):
            f.write("".join(line.replace("STEP", str(i)) for i in range(start, start + 10_000)))
    size = run.log.stat().st_size
    tracemalloc.start()
    try:
        run.truncate_log(199_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 30e6 and peak < 2e6, (size, peak)
    assert run.last_log_row().step == 199_000
    assert run.log.stat().st_size == size - 1000 * len(line.replace("STEP", "199500"))


def test_a_fresh_status_keeps_what_happened_to_the_checkpoints(tmp_path):
    """A re-queued arm resumes from the same folder: the set-aside checkpoints stay on its record."""
    run = RunDir(tmp_path / "a-s0")
    (run.checkpoint(4)).mkdir(parents=True)
    run.set_status(RUNNING, step=4)
    moved = run.set_aside(run.checkpoint(4), "state.pt does not match its checksum")
    run.update_status(restarted_from_zero=True)
    run.set_status(FAILED, error="boom")
    run.set_status(QUEUED, fresh=True)
    status = run.read_status()
    assert status.error is None and status.step is None and status.restarted_from_zero
    assert [(s.checkpoint, s.step, s.moved_to) for s in status.set_aside] == [
        ("step_00000004", 4, moved.relative_to(run.path).as_posix())
    ]
    assert run.set_aside_checkpoints() == [(4, moved)] and run.checkpoint_steps() == []


def test_a_corrupt_record_is_an_error_naming_its_file(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    run.status.write_text('{"state": "runn')
    with pytest.raises(Unreadable, match=f"^{run.status}: unreadable"):
        run.read_status()


def test_checkpoint_names_and_steps(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    for step in (20, 3):
        run.checkpoint(step).mkdir(parents=True)
    run.checkpoint_tmp(40).mkdir()  # being written: not complete
    assert run.checkpoint(3).name == "step_00000003" and run.checkpoint_steps() == [3, 20]


def test_failed_keeps_the_error_for_status(tmp_path):
    run = RunDir(tmp_path / "a-s0")
    run.path.mkdir()
    run.set_status(RUNNING, step=1)
    run.set_status(FAILED, error="ValueError: bad")
    assert run.read_status().error == "ValueError: bad" and run.read_status().step == 1
