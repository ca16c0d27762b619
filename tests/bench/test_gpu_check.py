"""``launch/gpu_check.sh``'s logic, on this machine without CUDA: the steps it plans for each count
of GPUs, that they are commands its tools accept, how a step that fails or overruns is reported,
the report, and its one line where there is no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from app import ROOT

from syncbn.bench import gpu_check
from syncbn.bench.cli import parse_args


def test_without_a_gpu_it_says_so_in_one_line_and_exits_1():
    done = subprocess.run(["bash", "launch/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr.splitlines()) == (1, [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"])
    assert not (ROOT / "gpu_check_report.md").exists()


@pytest.mark.parametrize("gpus,world_sizes,collective_world_sizes", [
    (1, ["1"], []), (2, ["1", "2"], [2]), (4, ["1", "2"], [2, 4]), (8, ["1", "2"], [2, 4, 8])])
def test_the_plan_runs_the_cuda_tests_then_the_bench_at_the_world_sizes_the_gpus_allow(gpus, world_sizes,
                                                                                       collective_world_sizes):
    """The collective case, both collectives on NCCL, at 2, 4 and 8 ranks as far as the GPUs go."""
    tests, bench = gpu_check.plan(gpus)
    assert tests.command[1:] == ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"]
    settings = parse_args(bench.command[3:])[0]  # the bench accepts it (a CUDA-less one too: nothing runs yet)
    assert (settings.device, [str(w) for w in settings.world_sizes]) == ("cuda", world_sizes)
    assert (settings.per_run_world_sizes, settings.study_models, settings.compile) == ([], [], False)
    assert ("collective" in settings.cases) == bool(collective_world_sizes)
    if collective_world_sizes:
        assert settings.collective_world_sizes == collective_world_sizes
    assert sum(step.limit_s for step in (tests, bench)) < 600, "the whole check stays under 10 minutes"


def test_the_cuda_tests_are_collected_here_and_skipped_with_the_reason():
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert "no CUDA device here: launch/gpu_check.sh runs these on a machine with GPUs" in done.stdout
    assert " passed" not in done.stdout and "skipped" in done.stdout


def test_a_step_reports_passed_failed_or_timed_out_with_the_tail_of_its_output():
    passed = gpu_check.run_step(gpu_check.Step("ok", [sys.executable, "-c", "print('fine')"], 30))
    failed = gpu_check.run_step(gpu_check.Step("bad", [sys.executable, "-c", "import sys; sys.exit('broke')"], 30))
    slow = gpu_check.run_step(gpu_check.Step("slow", [sys.executable, "-c", "import time; print('begun', flush=True); time.sleep(30)"], 2))
    assert (passed.status, passed.tail) == ("passed", "fine")
    assert (failed.status, failed.tail) == ("failed (exit 1)", "broke")
    assert slow.status == "timed out after 2 s" and slow.seconds < 10


def test_the_report_has_the_machine_a_row_per_step_each_steps_output_and_the_verdict():
    ok = gpu_check.Outcome(gpu_check.Step("cuda tests", ["pytest"], 1), "passed", 12.3, "5 passed")
    bad = gpu_check.Outcome(gpu_check.Step("bench on cuda", ["bench"], 1), "failed (exit 1)", 4.0, "boom")
    text = gpu_check.report("2 x H100; torch 2.14.1", [ok, bad])
    assert "Machine: 2 x H100; torch 2.14.1" in text
    assert "| cuda tests | passed | 12 |\n| bench on cuda | failed (exit 1) | 4 |" in text
    assert "$ bench\nboom\n```" in text and text.endswith("Verdict: SOME STEPS FAILED. Send this file with an issue on the project's tracker.\n")
    assert "Verdict: all passed." in gpu_check.report("x", [ok])


def test_the_report_names_the_machine_it_ran_on():
    line = gpu_check.machine()
    assert line.startswith(f"{torch.cuda.device_count()} x ") and f"; torch {torch.__version__}, CUDA " in line
    assert line.endswith(", NCCL -") or torch.cuda.is_available()
