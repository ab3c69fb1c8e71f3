"""Every bad sweep file ends `ablate run` with one located line, exit code 2, and nothing created."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ablate_testing import SWEEP


def replace(old: str, new: str, text: str = SWEEP) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def run_bad(write_sweep, cli, text: str) -> str:
    """Run a bad sweep; check the common contract; return the error line."""
    path = write_sweep(text)
    before = sorted(p.name for p in path.parent.iterdir())
    result = cli("run", path)
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"error: {path}:"), lines[0]
    assert "Traceback" not in result.err + result.out
    assert sorted(p.name for p in path.parent.iterdir()) == before, "something was created"
    return lines[0]


def expect(line: str, lineno: int, key: str, *fragments: str) -> None:
    assert re.match(rf"error: .*sweep\.yaml:{lineno}: {re.escape(key)}: ", line), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_yaml_syntax_error_names_its_line(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("  tokenizer: {kind: pixel}\n", "  tokenizer: {kind: pixel\n"))
    assert re.match(r"error: .*sweep\.yaml:7: YAML syntax error: .*; expected valid YAML", line), line


def test_duplicate_top_level_key(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "seeds: [1]\n")
    expect(line, 18, "seeds", "duplicate key 'seeds' (first at line 16)", "expected each key once")


def test_duplicate_key_inside_a_delta(write_sweep, cli):
    text = replace("    optimizer.lr: 3e-3\n", "    optimizer.lr: 3e-3\n    optimizer.lr: 1e-2\n")
    expect(run_bad(write_sweep, cli, text), 16, "deltas.lr-high.optimizer.lr", "duplicate key")


def test_unknown_top_level_key_suggests_the_right_one(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("seeds: [0]", "seed: [0]"))
    expect(line, 16, "seed", "unknown key 'seed' (did you mean 'seeds'?)", "expected one of: ", "rank_by")


def test_unknown_key_in_a_delta_has_full_path_and_did_you_mean(write_sweep, cli):
    text = replace("    optimizer.lr: 3e-3\n", "    optimizer:\n      kind: adamw\n      lrr: 3e-3\n")
    line = run_bad(write_sweep, cli, text)
    expect(
        line,
        17,
        "deltas.lr-high.optimizer.lrr",
        "unknown key 'lrr' (did you mean 'lr'?)",
        "expected one of: betas",
    )


def test_unknown_dotted_key_in_a_delta(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "optimizer.lrr: 3e-3"))
    expect(line, 15, "deltas.lr-high.optimizer.lrr", "did you mean 'lr'?")


def test_unknown_key_in_the_baseline(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("  precision: {kind: fp32}", "  precison: {kind: fp32}"))
    expect(line, 8, "baseline.precison", "unknown key 'precison' (did you mean 'precision'?)")


def test_unknown_key_inside_a_new_kind_points_at_the_delta(write_sweep, cli):
    text = replace("    optimizer.lr: 3e-3\n", "    optimizer: {kind: muon, betas: [0.9, 0.99]}\n")
    expect(
        run_bad(write_sweep, cli, text),
        15,
        "deltas.lr-high.optimizer.betas",
        "unknown key 'betas'",
        "adam_betas",
    )


def test_wrong_type_in_trainer_config(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "train.steps: many"))
    expect(line, 15, "deltas.lr-high.train.steps", "got 'many'", "expected a valid integer")


def test_wrong_type_in_sweep_schema(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("seeds: [0]", "seeds: [0, x]"))
    expect(line, 16, "seeds[1]", "got 'x'", "expected a valid integer")


def test_out_of_range_value_in_the_baseline(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("steps: 4,", "steps: 0,"))
    expect(line, 9, "baseline.train.steps", "got 0", "expected greater than or equal to 1")


def test_unknown_registry_kind_lists_the_valid_ones(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "optimizer.kind: adamx"))
    expect(
        line,
        15,
        "deltas.lr-high.optimizer.kind",
        "unknown optimizer kind 'adamx'",
        "expected one of: adamw, muon",
    )


def test_unknown_kind_of_an_optional_factor_mentions_null(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "ema: {kind: emma}"))
    expect(line, 15, "deltas.lr-high.ema.kind", "unknown ema kind 'emma'", "(or null to turn it off)")


def test_delta_that_changes_nothing(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "optimizer.lr: 0.001"))
    expect(line, 14, "deltas.lr-high", "changes nothing", "expected at least one value that differs")


def test_duplicate_seeds_make_duplicate_arm_names(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("seeds: [0]", "seeds: [0, 1, 0]"))
    expect(line, 16, "seeds[2]", "duplicate seed 0 (duplicate arm names)")


def test_a_deltas_seed_must_pair_with_a_baseline_seed(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("seeds: [0]", "seeds: {baseline: [0, 1, 2], deltas: [0, 5]}"))
    expect(
        line,
        16,
        "seeds.deltas[1]",
        "seed 5 has no baseline arm to pair with",
        "expected a seed of seeds.baseline (0, 1, 2)",
    )


def test_delta_named_baseline_is_a_duplicate_arm_name(write_sweep, cli):
    expect(
        run_bad(write_sweep, cli, replace("  lr-high:", "  baseline:")),
        14,
        "deltas.baseline",
        "duplicate arm",
    )


def test_delta_names_differing_only_in_case(write_sweep, cli):
    text = SWEEP.replace("seeds:", "  LR-high:\n    optimizer.lr: 1e-2\nseeds:")
    expect(run_bad(write_sweep, cli, text), 16, "deltas.LR-high", "differ only in case")


@pytest.mark.parametrize("bad", ["my delta", "../up", ".hidden", "a/b"])
def test_delta_name_must_be_path_safe(write_sweep, cli, bad):
    line = run_bad(write_sweep, cli, replace("  lr-high:", f"  '{bad}':"))
    expect(line, 14, f"deltas.{bad}", f"got '{bad}'", "expected a path-safe name")


def test_sweep_name_must_be_path_safe(write_sweep, cli):
    expect(run_bad(write_sweep, cli, replace("name: t", "name: ../t")), 1, "name", "path-safe")


def test_missing_required_key(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("name: t\n", ""))
    assert re.match(r"error: .*sweep\.yaml: name: missing required key 'name'; expected a value", line), line


def test_empty_file(write_sweep, cli):
    assert "the file is empty" in run_bad(write_sweep, cli, "")


def test_top_level_must_be_a_mapping(write_sweep, cli):
    assert "the file holds a list; expected a mapping" in run_bad(write_sweep, cli, "- a\n- b\n")


def test_setting_twice_in_one_delta(write_sweep, cli):
    text = replace("    optimizer.lr: 3e-3\n", "    optimizer.lr: 3e-3\n    optimizer: {lr: 1e-2}\n")
    expect(
        run_bad(write_sweep, cli, text),
        16,
        "deltas.lr-high.optimizer.lr",
        "set twice in this delta (also at line 15)",
    )


def test_seed_in_the_baseline_is_rejected(write_sweep, cli):
    expect(run_bad(write_sweep, cli, replace("  log:", "  seed: 3\n  log:")), 12, "baseline.seed", "seeds")


def test_delta_cannot_set_the_seed(write_sweep, cli):
    line = run_bad(write_sweep, cli, replace("optimizer.lr: 3e-3", "seed: 3"))
    expect(line, 15, "deltas.lr-high.seed", "a delta cannot set the seed")


def test_rank_by_direction(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "rank_by:\n  - val_loss: down\n")
    expect(line, 19, "rank_by[0].val_loss", "got 'down'", "expected 'lower' or 'higher'")


def test_rank_by_must_be_a_list(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "rank_by: {val_loss: lower}\n")
    expect(line, 18, "rank_by", "expected a list of metrics, in ranking order (`- val_loss`)")


def test_rank_by_an_unknown_metric_suggests_the_table_s_closest(write_sweep, cli):
    """A typo in a metric's name is caught before anything trains (it used to rank all arms on NaN)."""
    line = run_bad(write_sweep, cli, SWEEP + "rank_by:\n  - val_loss\n  - domain_fdd: higher\n")
    expect(line, 20, "rank_by[1].domain_fdd", "unknown metric 'domain_fdd' (did you mean 'domain_fd'?)",
           "expected a metric of the table (eval/metrics.py): val_loss, fid")  # fmt: skip


def test_rank_by_a_direction_that_contradicts_the_table(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "rank_by:\n  - val_loss: higher\n")
    expect(line, 19, "rank_by[0].val_loss", "val_loss is lower-is-better (the metric table), not higher",
           "expected '- val_loss' (the table gives its direction) or '- val_loss: lower'")  # fmt: skip


def test_rank_by_a_metric_no_arm_computes(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "rank_by:\n  - cmmd\n")
    expect(line, 19, "rank_by[0]", "no arm computes cmmd (it is in no arm's eval.metrics)",
           "expected cmmd in baseline.eval.metrics, or one the arms compute: val_loss")  # fmt: skip


def test_rank_by_a_metric_alone_takes_the_table_s_direction(write_sweep, cli):
    path = write_sweep(SWEEP + "rank_by:\n  - val_loss\n")
    result = cli("run", path, "--dry-run")
    assert result.code == 0, result.err
    from ablate.sweep.schema import load_sweep

    assert load_sweep(path).metrics == [("val_loss", "lower")]


def test_rank_by_one_metric_per_item(write_sweep, cli):
    line = run_bad(write_sweep, cli, SWEEP + "rank_by:\n  - {val_loss: lower, fid: lower}\n")
    expect(line, 19, "rank_by[0]", "2 metrics in one item")


def test_launcher_setting_the_executor_would_ignore(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: local, partition: gpu}")
    expect(
        run_bad(write_sweep, cli, text), 17, "launcher.partition", "the local executor does not use", "slurm"
    )


def test_additional_parameter_shadowing_a_field(write_sweep, cli):
    text = replace(
        "launcher: {executor: debug}", "launcher: {executor: slurm, additional_parameters: {partition: x}}"
    )
    expect(
        run_bad(write_sweep, cli, text), 17, "launcher.additional_parameters.partition", "launcher.partition"
    )


def test_unknown_launcher_key(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: local, time_limit: 5}")
    expect(run_bad(write_sweep, cli, text), 17, "launcher.time_limit", "did you mean 'time_limit_min'?")


def test_unknown_executor(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: k8s}")
    expect(
        run_bad(write_sweep, cli, text), 17, "launcher.executor", "got 'k8s'", "'debug', 'local' or 'slurm'"
    )


def test_missing_sweep_file(workdir: Path, cli):
    result = cli("run", workdir / "nope.yaml")
    assert result.code == 2 and result.err.startswith("error: ") and "cannot read" in result.err


def test_status_and_rank_report_the_same_errors(write_sweep, cli):
    path = write_sweep(replace("seeds: [0]", "seed: [0]"))
    for command in ("status", "rank"):
        result = cli(command, path)
        assert result.code == 2 and "did you mean 'seeds'?" in result.err


def test_a_delta_cannot_move_its_arm_to_another_wandb_project(write_sweep, cli):
    line = run_bad(
        write_sweep,
        cli,
        replace("    optimizer.lr: 3e-3\n", "    optimizer.lr: 3e-3\n    log.wandb.project: x\n"),
    )
    expect(line, 16, "deltas.lr-high.log.wandb.project", "W&B settings are the sweep's", "baseline.log.wandb")


def test_a_batch_the_launchers_processes_cannot_split_is_refused_before_submission(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: local, tasks_per_node: 3}")
    line = run_bad(write_sweep, cli, text)
    expect(line, 9, "baseline.train.batch_size", "does not split evenly over 3 processes",
           "1 node(s) × 3 task(s)", "expected a multiple of 3")  # fmt: skip


def test_hsdp_replica_groups_must_divide_the_launchers_processes(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: local, tasks_per_node: 2}")
    text = replace(
        "    optimizer.lr: 3e-3\n",
        "    optimizer.lr: 3e-3\n  hsdp:\n    parallel: {kind: fsdp, hybrid: 3}\n",
        text,
    )
    line = run_bad(write_sweep, cli, text)
    expect(line, 17, "deltas.hsdp.parallel.hybrid", "3 replica groups, which do not divide the 2 processes",
           "expected a divisor of 2, true or false")  # fmt: skip


def test_contrastive_groups_must_fit_the_launchers_per_process_batch(write_sweep, cli):
    text = replace("launcher: {executor: debug}", "launcher: {executor: local, tasks_per_node: 2}")
    text = replace(
        "    optimizer.lr: 3e-3\n",
        "    optimizer.lr: 3e-3\n  contrastive-fm:\n    contrastive: {kind: contrastive, group: 4}\n",
        text,
    )
    line = run_bad(write_sweep, cli, text)
    expect(line, 17, "deltas.contrastive-fm.contrastive.group",
           "contrastive.group 4 does not divide the per-process batch 2 (train.batch_size 4 over 2 processes)",
           "1 node(s) × 2 task(s)", "expected a divisor of 2")  # fmt: skip
