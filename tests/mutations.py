"""Hand mutations for the code that runs inside spawned ranks (the trainer, the launcher, the
collective paths of the layer), where mutmut cannot see: each changes one line as a plausible
slip would, and names the tests that must fail when it does.

    python -m tests.mutations --list        # every mutation and its tests
    python -m tests.mutations               # apply each in turn, run its tests, put the line back
    python -m tests.mutations NAME...       # only these

Exit status 1 if a mutation survives (its tests pass with the line changed) or no longer applies
(the line it changes is gone: update it here). docs/development.md gives the current result.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


def trainer(name: str) -> str:
    return f"tests/training/test_loop.py::{name}"


def evaluation(name: str) -> str:
    return f"tests/training/test_evaluation.py::{name}"


def train(name: str) -> str:
    return f"tests/test_train.py::{name}"


def torchrun(name: str) -> str:
    return f"tests/test_torchrun.py::{name}"


def errors(name: str) -> str:
    return f"tests/test_train_errors.py::{name}"


STALLED = "tests/test_functional.py::test_a_stalled_rank_makes_the_others_fail_within_the_timeout_naming_the_collective"


def agreement(name: str) -> str:
    return f"tests/test_agreement.py::{name}"


def join(name: str) -> str:
    return f"tests/test_join.py::{name}"


def distributed(name: str) -> str:
    return f"tests/test_distributed.py::{name}"


def faults(name: str) -> str:
    return f"tests/test_train_faults.py::{name}"


def layer(name: str) -> str:
    return f"tests/test_batchnorm.py::{name}"


MUTATIONS = [
    Mutation("frozen-by-member-id", "syncbn/training/loop.py",
             "local = [index for index, member in enumerate(rows) if member in frozen]",
             "local = [member for member in rows if member in frozen]",
             (trainer("test_frozen_members_get_back_their_own_rows_in_every_norm_block_and_no_one_else_does"),)),
    Mutation("frozen-not-put-back", "syncbn/training/loop.py", "            self.frozen.restore()\n", "            pass\n",
             (trainer("test_a_member_that_diverges_is_frozen_and_changes_nothing_for_the_others"),)),
    Mutation("diverged-not-frozen-until-resume", "syncbn/training/loop.py",
             "            self.frozen = FrozenMembers(self.model.module, progress.diverged, len(self.members))\n",
             "            pass\n",
             (trainer("test_a_member_that_diverges_is_frozen_and_changes_nothing_for_the_others"),)),
    Mutation("ranks-agree-without-weights", "syncbn/training/resume.py",
             "[progress.epoch, progress.step, weights_digest(self.model)]", "[progress.epoch, progress.step, 0]",
             (trainer("test_ranks_at_the_same_step_with_different_weights_all_stop_naming_the_weights"),)),
    Mutation("ranks-agree-on-epoch-only", "syncbn/training/resume.py",
             "[progress.epoch, progress.step, weights_digest(self.model)]", "[progress.epoch, 0, 0]",
             (trainer("test_ranks_in_the_same_epoch_at_different_steps_all_stop_naming_both_steps"),)),
    Mutation("partial-sums-on-every-rank", "syncbn/training/loop.py",
             "if self.ctx.is_main and progress.loss_sums is not None:", "if progress.loss_sums is not None:",
             (trainer("test_a_run_stopped_mid_epoch_resumes_bit_exactly_with_dropout_and_optimizer_state"),)),
    Mutation("mid-epoch-sums-kept-on-every-rank", "syncbn/training/loop.py",
             "return group_totals if self.ctx.is_main else torch.zeros_like(totals)", "return group_totals",
             (trainer("test_checkpointing_mid_epoch_changes_no_metric"),)),
    Mutation("evaluated-in-train-mode", "syncbn/training/evaluation.py", "    model.eval()\n", "    model.train()\n",
             (trainer("test_syncbn_trains_the_same_at_every_world_size_and_local_bn_does_not"),)),
    Mutation("eval-counts-not-summed-over-ranks", "syncbn/training/evaluation.py", "= all_reduce_sum(local).split(", "= local.split(",
             (trainer("test_syncbn_trains_the_same_at_every_world_size_and_local_bn_does_not"),)),
    Mutation("all-diverged-run-not-finished", "syncbn/training/loop.py",
             "progress.epoch = self.config.train.epochs + 1 if finished else progress.epoch + 1",
             "progress.epoch = progress.epoch + 1",
             (train("test_a_diverging_run_is_recorded_and_the_sweep_goes_on"),)),
    Mutation("fault-fires-on-every-attempt", "syncbn/training/loop.py",
             "return fault.kill_at_step if first_attempt and fault.kill_rank == rank else None",
             "return fault.kill_at_step if fault.kill_rank == rank else None",
             (faults("test_a_rank_killed_before_the_first_checkpoint_is_restarted_once_and_the_run_finishes"),)),
    Mutation("metrics-written-by-every-rank", "syncbn/training/records.py",
             'self.path = run_dir / "metrics.jsonl" if run_dir is not None and ctx.is_main else None',
             'self.path = run_dir / "metrics.jsonl" if run_dir is not None else None',
             (train("test_cpu_simulation_runs_two_ranks_and_writes_metrics"),)),
    Mutation("fresh-start-reads-the-checkpoint", "syncbn/training/resume.py",
             "    if not config.train.resume:\n        return None\n    state", "    state",
             (errors("test_a_fresh_start_does_not_read_the_checkpoint_it_will_replace"),)),
    Mutation("signal-exit-code-sign", "syncbn/endings.py", "if -failure.exitcode in EXIT_STATUS:",
             "if failure.exitcode in EXIT_STATUS:",
             (errors("test_only_sigint_and_sigterm_count_as_interrupts_and_a_rank_killed_by_one_is_one"),)),
    Mutation("sigterm-exit-status", "syncbn/endings.py", "EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}",
             "EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 130}",
             (train("test_an_interrupted_run_stops_every_process_with_one_line"),)),
    Mutation("every-torchrun-rank-owns-the-directory", "syncbn/train.py",
             'return int(os.environ.get("RANK", 0)) == 0', "return True",
             (train("test_torchrun_restarts_a_killed_rank_and_resumes_bit_exactly"),)),
    Mutation("torchrun-ranks-print-their-own-failure", "syncbn/endings.py",
             'if "TORCHELASTIC_ERROR_FILE" in os.environ:', "if False:",
             (torchrun("test_a_killed_rank_is_one_line_naming_it_and_not_the_peer_that_failed_after_it"),
              torchrun("test_a_rank_error_is_one_line_with_its_cause_naming_the_file_and_leaves_no_partial_checkpoint"))),
    Mutation("torchrun-starts-unchecked", "syncbn/torchrun.py", "if world_size is not None and (status",
             "if False and (status", (torchrun("test_bad_input_is_one_line_and_starts_no_rank"),)),
    Mutation("torchrun-killed-by-an-early-sigterm", "syncbn/torchrun.py",
             "signal.signal(signal.SIGTERM, endings.raise_on_sigterm)", "pass",
             (torchrun("test_sigterm_while_the_command_is_checked_is_one_line_exit_143_and_leaves_nothing"),)),
    Mutation("ranks-outlive-their-launcher", "syncbn/distributed.py", "    die_with(launcher)\n", "    pass\n",
             (faults("test_ranks_end_with_their_killed_launcher_and_no_second_run_writes_their_directory"),)),
    Mutation("writing-rank-holds-no-lock", "syncbn/train.py",
             "if int(os.environ[\"RANK\"]) == 0 else contextlib.nullcontext()", "if False else contextlib.nullcontext()",
             (faults("test_ranks_end_with_their_killed_launcher_and_no_second_run_writes_their_directory"),)),
    Mutation("earlier-runs-rank-not-looked-for", "syncbn/training/checkpoint.py", "        if lock == LOCK:\n",
             "        if lock != LOCK:\n",
             (faults("test_a_run_is_refused_while_a_rank_of_an_earlier_one_still_writes_its_directory"),)),
    Mutation("fresh-start-over-the-old-run", "syncbn/train.py",
             "moved = None if config.train.resume else checkpoint.set_aside(run_dir)", "moved = None",
             (faults("test_a_fresh_start_moves_the_old_run_aside_so_a_kill_before_its_first_checkpoint_mixes_no_runs"),)),
    Mutation("metrics-without-checkpoint-restarted", "syncbn/training/resume.py",
             "        checkpoint.require_checkpoint_for(run_dir)\n", "        pass\n",
             (faults("test_metrics_whose_checkpoints_are_gone_are_not_restarted_over_but_moved_aside_by_a_fresh_start"),)),
    Mutation("fault-fires-again-on-resume", "syncbn/training/loop.py",
             "fault_step(config.fault, ctx.rank) if self.progress.global_step == 0 else None",
             "fault_step(config.fault, ctx.rank)",
             (faults("test_the_command_of_a_faulted_run_resumes_it_and_says_which_checkpoint_it_read"),)),
    Mutation("resumed-from-named-as-latest", "syncbn/training/resume.py", "checkpoint.newest(self.run_dir),",
             "self.run_dir / checkpoint.LATEST,",
             (faults("test_the_command_of_a_faulted_run_resumes_it_and_says_which_checkpoint_it_read"),)),
    Mutation("launcher-stopped-rank-blamed", "syncbn/distributed.py",
             "for rank, failure in error.failures.items() if failure.exitcode != -signal.SIGTERM}",
             "for rank, failure in error.failures.items()}",
             (distributed("test_the_first_failure_is_the_earliest_rank_the_launcher_did_not_stop"),)),
    Mutation("error-file-written-in-place", "syncbn/distributed.py", "        Path(aside).write_text(json.dumps(report))\n",
             "        Path(path).write_text(json.dumps(report))\n",
             (distributed("test_an_error_file_that_cannot_be_written_is_left_absent_not_half_written"),)),
    Mutation("half-written-error-file-left-aside", "syncbn/distributed.py", "        Path(aside).unlink(missing_ok=True)\n",
             "        pass\n", (distributed("test_an_error_file_that_cannot_be_written_is_left_absent_not_half_written"),)),
    Mutation("failed-rank-traceback-shown", "syncbn/distributed.py",
             'logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)',
             "pass", (train("test_without_restarts_a_killed_rank_ends_the_launch_with_one_line"),)),
    Mutation("group-of-one-synchronizes", "syncbn/batchnorm.py", "group.size() > 1 else None",
             "group.size() > 0 else None", (layer("test_one_collective_each_way_per_layer"),)),
    Mutation("cumulative-average-lost", "syncbn/batchnorm.py",
             "momentum = 1.0 / float(batches) if momentum is None else momentum",
             "momentum = 0.1 if momentum is None else momentum", (layer("test_parity_with_batchnorm_on_global_batch"),)),
    Mutation("eval-without-running-stats-uses-none", "syncbn/batchnorm.py",
             "self.running_mean is None and self.running_var is None, 0.0, self.eps)", "False, 0.0, self.eps)",
             (layer("test_parity_with_batchnorm_on_global_batch"),)),
    Mutation("rank-loss-as-its-own-mean", "syncbn/training/loop.py",
             "share = self.ctx.world_size / self.batches.global_size(progress.step)",
             "share = 1 / max(labels.numel(), 1)",
             (trainer("test_where_the_data_does_not_divide_n_ranks_still_train_like_one_process"),)),
    Mutation("short-last-batch-weighted-as-full", "syncbn/training/loop.py",
             "share = self.ctx.world_size / self.batches.global_size(progress.step)",
             "share = self.ctx.world_size / self.config.train.global_batch_size",
             (trainer("test_where_the_data_does_not_divide_n_ranks_still_train_like_one_process"),)),
    Mutation("per-rank-bn-evaluated-with-each-ranks-statistics", "syncbn/training/loop.py",
             "            broadcast_buffers_from_main(self.model)\n", "            pass\n",
             (trainer("test_per_rank_batchnorm_is_evaluated_everywhere_with_rank_0s_statistics"),)),
    Mutation("normalized-with-local-statistics", "syncbn/functional.py",
             "return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps,",
             "return torch.batch_norm(x, weight, bias, mean, var, True, 0.0, eps,",
             (layer("test_parity_with_batchnorm_on_global_batch"),)),
    Mutation("failed-backward-named-forward", "syncbn/functional.py",
             'sums = start_sum(packed, ctx.group, "backward", ctx.collective)',
             'sums = start_sum(packed, ctx.group, "forward", ctx.collective)', (STALLED,)),
    Mutation("failed-all-reduce-named-all-gather", "syncbn/comm.py",
             'packed, phase, group.size(), "all_reduce")', 'packed, phase, group.size(), "all_gather")', (STALLED,)),
    Mutation("all-reduce-never-takes-its-second-round", "syncbn/functional.py",
             "count, second = checked_count(int(total), x), bool(cancelled)",
             "count, second = checked_count(int(total), x), False",
             (agreement("test_channels_far_from_zero_are_exact_from_the_first_step"),)),
    Mutation("all-reduce-always-takes-its-second-round", "syncbn/functional.py",
             "count, second = checked_count(int(total), x), bool(cancelled)",
             "count, second = checked_count(int(total), x), True",
             (layer("test_each_collective_is_one_call_each_way_and_gives_every_rank_the_same_bits"),)),
    Mutation("second-round-about-zero-again", "syncbn/functional.py",
             "    shift = first[1 : x.size(1) + 1] / _at_least_one(count)\n",
             "    shift = torch.zeros_like(first[1 : x.size(1) + 1])\n",
             (agreement("test_channels_far_from_zero_are_exact_from_the_first_step"),)),
    Mutation("all-reduce-backward-gathers", "syncbn/comm.py",
             '    if collective == "all_reduce":\n        return start_all_reduce(packed, group, phase)\n', "",
             (layer("test_each_collective_is_one_call_each_way_and_gives_every_rank_the_same_bits"),)),
    Mutation("gradient-sums-in-the-inputs-dtype", "syncbn/functional.py",
             "packed = torch.cat([sum_dy, sum_dy_xhat]).to(torch.float64)", "packed = torch.cat([sum_dy, sum_dy_xhat])",
             (agreement("test_ranks_of_different_dtypes_run_one_collective_and_normalize_by_the_whole_batch"),)),
    Mutation("half-gradient-rounded-term-by-term", "syncbn/functional.py",
             "x_stat, grad_stat = _cast(x, mean.dtype), _cast(grad_out, mean.dtype)", "x_stat, grad_stat = x, grad_out",
             (agreement("test_half_precision_input_gradients_are_as_accurate_as_torchs_and_finite_where_its_are"),
              "tests/test_compile.py::test_compiled_half_precision_input_gradients_are_as_accurate_as_torchs")),
    Mutation("auto-ignores-its-cost-model", "syncbn/batchnorm.py",
             "model = self.cost_model or model_for(backend)", "model = model_for(backend)",
             (layer("test_auto_runs_the_collective_its_cost_model_chooses_for_the_group_and_shows_it"),)),
    Mutation("auto-never-chooses-again", "syncbn/batchnorm.py", "if key != self.auto_key:",
             "if self.auto_key is None:", (layer("test_auto_chooses_again_when_the_groups_size_or_its_model_changes"),)),
    Mutation("auto-chooses-again-only-for-the-group", "syncbn/batchnorm.py",
             "group._get_backend_name(), self.cost_model, compiling)", "group._get_backend_name(), compiling)",
             (layer("test_auto_chooses_again_when_the_groups_size_or_its_model_changes"),)),
    Mutation("auto-by-the-world-not-the-group", "syncbn/batchnorm.py", "key = (group.size(), ",
             "key = (dist.get_world_size(), ",
             (layer("test_auto_chooses_again_when_the_groups_size_or_its_model_changes"),)),
    Mutation("auto-forgets-the-compiled-second-round", "syncbn/batchnorm.py",
             "reduce_rounds=2 if compiling else 1)", "reduce_rounds=1)",
             ("tests/test_compile.py::test_auto_counts_the_compiled_all_reduces_second_forward_round",)),
    Mutation("joined-rank-backpropagates-every-output", "syncbn/join.py",
             "used = self._used or self._last_used or None", "used = None",
             (join("test_uneven_batches_under_join_finish_and_train_as_one_process_on_what_the_active_ranks_hold"),)),
    Mutation("joined-rank-runs-no-step", "syncbn/join.py", "            self.joinable.shadow_step()\n",
             "            pass\n",
             (join("test_uneven_batches_under_join_finish_and_train_as_one_process_on_what_the_active_ranks_hold"),)),
    Mutation("joined-rank-shadows-before-ddps-hook", "syncbn/join.py",
             '        self.thread = threading.Thread(target=self._run, name="syncbn-join-shadow", daemon=True)\n'
             "        self.thread.start()\n", "        self._run()\n",
             (join("test_uneven_batches_under_join_finish_and_train_as_one_process_on_what_the_active_ranks_hold"),)),
    Mutation("joined-layers-on-the-shared-group", "syncbn/join.py",
             "            layer.process_group = self._twins[_ranks(group)]\n", "            pass\n",
             (join("test_uneven_batches_under_join_finish_and_train_as_one_process_on_what_the_active_ranks_hold"),)),
    Mutation("received-bytes-of-the-whole-group", "syncbn/bench/collectives.py",
             "written.item() / dist.get_world_size() / calls", "written.item() / calls",
             ("tests/bench/test_collectives.py::test_each_rank_receives_what_the_ring_moves_and_only_the_all_gathers_bytes_grow_with_the_ranks",)),
    Mutation("unequal-counts-merged-without-spread", "syncbn/functional.py",
             "    moments[:, channels:] += weights @ (deviation * deviation)\n", "",
             (layer("test_parity_with_batchnorm_on_global_batch"),)),
    Mutation("unequal-counts-taken-as-equal", "syncbn/functional.py",
             "return checked_count(int(sum(counts)), x), min(counts) == max(counts)",
             "return checked_count(int(sum(counts)), x), True", (layer("test_parity_with_batchnorm_on_global_batch"),)),
    Mutation("one-value-on-a-rank-taken-as-none", "syncbn/functional.py", "    if x.numel() == 0:\n        zeros",
             "    if x.numel() <= 1:\n        zeros",
             (layer("test_a_rank_holding_one_value_per_channel_sends_its_share_of_the_gradient"),)),
    Mutation("single-value-in-the-group-allowed", "syncbn/functional.py", "    if count == 1:\n", "    if count == 0:\n",
             ("tests/test_functional.py::test_one_value_per_channel_in_the_whole_group_raises_on_every_rank",)),
    Mutation("per-rank-bn-as-syncbn-at-every-batch", "syncbn/experiments/study_plan.py",
             '    elif world_size == 1 and "syncbn" in norms:', '    elif "syncbn" in norms:',
             ("tests/experiments/test_study_plan.py::test_the_default_study_is_four_fused_jobs_whose_rows_are_each_model_norm_batch_and_seed_once",
              "tests/experiments/test_batch_size.py::test_the_fused_study_gives_the_per_run_studys_rows_and_writes_the_csv_and_the_figure[small]")),
    Mutation("training-pools-by-maxima", "syncbn/training/members.py",
             "    if (torch.is_grad_enabled() and x.requires_grad) or x.size(-1) % 2", "    if x.size(-1) % 2",
             ("tests/training/test_members.py::test_the_fused_cnns_pool_is_max_pool_bit_for_bit_with_ties_nan_and_infinities",)),
    Mutation("odd-width-pooled-by-maxima", "syncbn/training/members.py", " or x.size(-1) % 2 or x.size(-2) % 2:",
             " or x.size(-2) % 2:",
             ("tests/training/test_members.py::test_the_fused_cnns_pool_is_max_pool_bit_for_bit_with_ties_nan_and_infinities",)),
    Mutation("join-shadows-finished-groups", "syncbn/join.py",
             "        self._activity = dist.new_group(list(whole)) if any(ranks != whole for ranks in self._twins) else None",
             "        self._activity = None",
             (join("test_bn_groups_under_join_train_as_one_process_normalizing_each_groups_active_ranks"),)),
    Mutation("join-activity-ignores-group", "syncbn/join.py",
             "if ranks & set(_ranks(group))]", "if ranks]",
             (join("test_bn_groups_under_join_train_as_one_process_normalizing_each_groups_active_ranks"),)),
    Mutation("join-shadow-updates-resting-layers", "syncbn/join.py",
             "                module.training = False\n", "                pass\n",
             (join("test_a_joined_ranks_layer_with_no_peer_training_is_left_as_its_own_steps_left_it"),)),
    Mutation("join-runs-model-with-nothing-to-shadow", "syncbn/join.py",
             "        if not shadowed:\n            return\n", "",
             (join("test_bn_groups_under_join_train_as_one_process_normalizing_each_groups_active_ranks"),)),
    Mutation("join-checks-across-groups", "syncbn/join.py",
             "            column = table[list(_ranks(group)), index]", "            column = table[:, index]",
             (join("test_bn_groups_under_join_train_as_one_process_normalizing_each_groups_active_ranks"),)),
    Mutation("join-leaves-hooks-after-error", "syncbn/join.py",
             "        if not layer_joinable.closed:", "        if layer_joinable._twins:",
             (join("test_an_exception_inside_the_context_leaves_the_model_as_it_was"),)),
    Mutation("groups-not-consecutive", "syncbn/batchnorm.py",
             "[dist.get_rank() // group_size]", "[dist.get_rank() % (world_size // group_size)]",
             ("tests/test_groups.py::test_bn_groups_are_consecutive_ranks_made_once_per_world",
              "tests/test_groups.py::test_each_group_is_batchnorm_on_its_groups_concatenated_batch")),
    Mutation("groups-made-in-the-step", "syncbn/batchnorm.py",
             "            _bn_group(group_size)  # every rank builds the model", "            pass  # every rank builds the model",
             ("tests/test_groups.py::test_a_compiled_grouped_layer_has_no_graph_break_and_is_batchnorm_on_its_group",)),
    Mutation("bn-groups-of-one-is-none", "syncbn/batchnorm.py", "    if group is None:\n        world, rank",
             "    if False:\n        world, rank",
             ("tests/test_groups.py::test_bn_groups_are_consecutive_ranks_made_once_per_world",)),
    Mutation("group-size-ignored", "syncbn/batchnorm.py",
             "            group = _bn_group(self.group_size) if dist.is_initialized() else None",
             "            group = dist.group.WORLD",
             ("tests/test_groups.py::test_each_group_is_batchnorm_on_its_groups_concatenated_batch",)),
    Mutation("precise-not-merged-over-ranks", "syncbn/precise.py",
             "    return group if dist.get_world_size(group) > 1 else None", "    return None",
             ("tests/test_precise.py::test_over_ranks_it_is_one_process_population_of_the_whole_set",)),
    Mutation("precise-empty-shard-divides-by-zero", "syncbn/precise.py", "n_b / n.clamp(min=1)", "n_b / n",
             ("tests/test_precise.py::test_over_ranks_it_is_one_process_population_of_the_whole_set",)),
    Mutation("precise-one-ranks-error-stays-its-own", "syncbn/precise.py",
             "    if error is not None:\n        raise error\n", "",
             ("tests/test_precise.py::test_one_ranks_bad_batch_is_every_ranks_error_not_a_hang",)),
    Mutation("precise-measures-in-train-mode", "syncbn/precise.py", "    network.eval()\n", "",
             ("tests/test_precise.py",)),
    Mutation("precise-levels-unchecked", "syncbn/precise.py", "        if len(set(levels)) < len(names):\n",
             "        if False:\n", ("tests/test_precise.py::test_layers_no_other_feeds_are_measured_in_one_pass_and_checked",)),
    Mutation("precise-check-sees-no-difference", "syncbn/precise.py", "if not torch.equal(row, measured[name])",
             "if False", ("tests/test_precise.py::test_layers_no_other_feeds_are_measured_in_one_pass_and_checked",)),
    Mutation("precise-probe-ignored", "syncbn/precise.py",
             "            levels[later] = max(levels[later], levels[index] + 1)", "            pass",
             ("tests/test_precise.py::test_layers_no_other_feeds_are_measured_in_one_pass_and_checked",)),
    Mutation("precise-nan-refusing-network-in-one-level", "syncbn/precise.py",
             "            return list(range(len(names)))", "            return [0] * len(names)",
             ("tests/test_precise.py::test_a_network_that_refuses_nan_is_measured_one_layer_at_a_time",)),
    Mutation("grouped-run-keeps-each-ranks-statistics", "syncbn/training/loop.py",
             'member.norm == "bn" or (member.norm == "syncbn" and grouped)', 'member.norm == "bn"',
             (evaluation("test_a_run_in_bn_groups_trains_as_the_fused_member_that_emulates_its_groups"),)),
    Mutation("group-size-of-the-world-recorded", "syncbn/training/loop.py",
             "    return member.bn_group or config.norm.group_size or world_size",
             "    return config.norm.group_size or world_size",
             (evaluation("test_a_run_in_bn_groups_trains_as_the_fused_member_that_emulates_its_groups"),)),
    Mutation("groups-of-slices-not-interleaved", "syncbn/training/fused.py",
             "return ranks.transpose(2, 3).reshape(self.size, groups * self.num_features, self.group, *spatial)",
             "return input.reshape(self.size, groups * self.num_features, self.group, *spatial)",
             ("tests/training/test_members.py::test_slices_in_bn_groups_are_synchronized_batchnorm_of_that_group_size_on_as_many_ranks",)),
    Mutation("precise-statistics-kept-for-training", "syncbn/training/evaluation.py",
             "        with running_statistics_kept(model.module):", "        if True:",
             (evaluation("test_every_epochs_precise_metrics_leave_training_bit_for_bit_as_it_was"),)),
    Mutation("batch-statistics-contiguous-shares", "syncbn/training/evaluation.py",
             "mine = slice(start + ctx.rank, start + global_batch, ctx.world_size)",
             "mine = slice(start + ctx.rank * (global_batch // ctx.world_size), start + (ctx.rank + 1) * (global_batch // ctx.world_size))",
             (evaluation("test_batch_statistics_metrics_agree_across_world_sizes_and_emulation"),)),
    Mutation("batch-statistics-in-eval-mode", "syncbn/training/evaluation.py",
             "            module.train()\n", "            pass\n",
             (evaluation("test_precise_and_batch_metrics_are_the_final_networks_computed_in_one_process"),)),
    Mutation("precise-shard-of-rank-0", "syncbn/training/evaluation.py",
             "self.images = dataset.tensors[0][ctx.rank :: ctx.world_size]", "self.images = dataset.tensors[0][:: ctx.world_size]",
             (evaluation("test_precise_and_batch_metrics_are_the_final_networks_computed_in_one_process"),)),
]


def run_tests(tests: tuple[str, ...]) -> int:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        return subprocess.run(command, cwd=ROOT, capture_output=True, timeout=900).returncode
    except subprocess.TimeoutExpired:
        return -1


def check(mutation: Mutation) -> str:
    """``killed`` (a test failed), ``survived`` or ``stale`` (the line is not there once)."""
    path = ROOT / mutation.path
    source = path.read_text()
    if source.count(mutation.original) != 1:
        return "stale"
    path.write_text(source.replace(mutation.original, mutation.mutated))
    try:
        status = run_tests(mutation.tests)
    finally:
        path.write_text(source)
    # 1: tests failed. 2-5 (interrupted, internal error, usage, nothing collected) prove nothing.
    return "killed" if status in (1, -1) else "survived"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    args = parser.parse_args(argv)
    by_name = {mutation.name: mutation for mutation in MUTATIONS}
    unknown = [name for name in args.names if name not in by_name]
    if unknown:
        parser.error(f"unknown mutation {', '.join(unknown)}; see --list")
    chosen = [by_name[name] for name in args.names] or MUTATIONS
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}  {mutation.path}\n  - {mutation.original.strip()}\n  + {mutation.mutated.strip()}\n"
                  f"  {' '.join(mutation.tests)}")
        return 0
    results = []
    for mutation in chosen:
        start = time.monotonic()
        results.append(check(mutation))
        print(f"{results[-1]:8}  {mutation.name}  ({time.monotonic() - start:.0f}s)", flush=True)
    print(", ".join(f"{results.count(r)} {r}" for r in ("killed", "survived", "stale")))
    return 0 if all(r == "killed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
