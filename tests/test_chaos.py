"""A small seeded chaos run in the suite (``tests/chaos.py``; docs/reliability.md has the figures of a
100-fault run): on the CPU simulation, a rank hung by SIGSTOP 60 % into the run and the launcher
SIGKILLed 64 % into it. Each run is resumed the documented way and ends with the uninterrupted
run's metrics and parameters, bit for bit; no process of it is left, no stray file, no hang, and
each fault is reported in at most 3 lines."""

from __future__ import annotations

import chaos


def test_seeded_faults_on_the_cpu_simulation_leave_every_run_exact_and_clean(tmp_path):
    outcomes = chaos.chaos(2, 28, ("simulation",), tmp_path, log=lambda line: None)
    assert [(o.fault.kind, o.fault.workload) for o in outcomes] == [("stop_rank", "single"), ("kill_launcher", "single")]
    for outcome in outcomes:
        assert not outcome.hit.startswith("no "), f"the fault struck nothing: {outcome}"
        assert not outcome.differs and not outcome.hung, outcome
        assert (outcome.left_behind, outcome.stray_files) == (0, []), outcome
        assert len(outcome.lines) <= 3 and not any(line.startswith("[W") for line in outcome.lines), outcome.lines
    hung = outcomes[0]
    # A hung peer: noticed at dist.timeout_s; the launcher then waits its grace for the stopped rank.
    assert hung.seconds_to_message < chaos.TIMEOUT_S + chaos.GRACE_S + 15
