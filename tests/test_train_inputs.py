"""Every value a user can type, generated from the config schema: each out-of-range, non-finite,
mistyped or unknown value is one line naming the key, exit 1, and nothing left on disk."""

from __future__ import annotations

import itertools
import typing
from dataclasses import is_dataclass

import pytest
from app import cli, read_metrics

from syncbn.training.config import Config
from syncbn.training.validation import SEEDS

CHOICES = {"norm.name", "optim.name", "data.name", "model.name", "train.dtype", "dist.backend", "dist.device", "logger.name", "train.precision",
           "train.precise_bn"}
FREE_TEXT = {"data.root"}  # any path names a place for the data


def schema_keys(schema: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    for name, hint in typing.get_type_hints(schema).items():
        if is_dataclass(hint):
            yield from schema_keys(hint, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", hint


def bad_values(key: str, hint: object) -> list[str]:
    """Values of ``key`` that no run can use, by the key's type."""
    kinds = set(typing.get_args(hint)) or {hint}
    item = typing.get_args(next((k for k in kinds if typing.get_origin(k) is list), None) or list)
    too_big = "4294967296" if key in SEEDS else "2147483648"
    if item:
        if item[0] is float:
            return ["[nan]", "[inf,0.1]", "[-1]", "[abc]"]
        if item[0] is int:
            return ["[-1]", f"[{too_big}]", "[abc]"]
        return ["[bogus]"]
    if bool in kinds:
        return ["maybe"]
    if float in kinds:
        return ["nan", "inf", "-inf", "-1", "abc"]
    if int in kinds:
        return ["-1", too_big, "abc", "1.5"]
    return ["meta", "bogus"] if key == "dist.device" else ["bogus"]


KEYS = [(key, hint) for key, hint in schema_keys() if key not in FREE_TEXT]
SINGLE = [(f"{key}={value}",) for key, hint in KEYS for value in bad_values(key, hint)]
PAIRS = [(f"{a}={bad_values(a, ha)[0]}", f"{b}={bad_values(b, hb)[-1]}") for (a, ha), (b, hb) in itertools.pairwise(KEYS)]


def test_the_battery_knows_every_type_in_the_schema_and_is_large():
    """A key of a type ``bad_values`` has no bad values for, or a text key that is neither a choice
    nor free text (whose "bogus" might be a good value), must be taught to the battery first."""
    for key, hint in schema_keys():
        kinds = {typing.get_origin(kind) or kind for kind in typing.get_args(hint) or [hint]}
        assert kinds <= {int, float, str, bool, list, type(None)}, f"{key}: no bad values known for {hint}"
        assert str not in kinds or key in CHOICES | FREE_TEXT, f"{key}: a choice or free text?"
    assert len(SINGLE) + len(PAIRS) >= 150


def named(override: str, err: str) -> bool:
    key = override.split("=")[0]
    return key in err or (key in CHOICES and key.removesuffix(".name") + " must be one of" in err)


@pytest.mark.parametrize("overrides", SINGLE + PAIRS, ids="|".join)
def test_every_bad_value_is_one_line_naming_its_key_and_leaves_nothing(monkeypatch, capsys, tmp_path, overrides):
    run_dir = tmp_path / "run"
    code, err = cli(monkeypatch, capsys, *overrides, f"hydra.run.dir={run_dir}")
    assert code == 1 and err.count("\n") == 1 and err.startswith("syncbn.train: error: "), err
    assert any(named(override, err) for override in overrides), err
    assert list(tmp_path.iterdir()) == [], "a refused command leaves nothing behind"


def test_a_refused_command_leaves_a_directory_with_a_run_in_it_alone(monkeypatch, capsys, tmp_path):
    assert cli(monkeypatch, capsys, "train.epochs=1", "data.train_size=100", f"hydra.run.dir={tmp_path}")[0] == 0
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    code, err = cli(monkeypatch, capsys, "train.epochs=1", "data.train_size=100", "optim.lr=nan", f"hydra.run.dir={tmp_path}")
    assert code == 1 and "optim.lr must be a finite number, got nan" in err
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before and len(read_metrics(tmp_path)) == 1


def test_a_refused_command_in_the_default_directory_leaves_no_empty_outputs_behind(monkeypatch, capsys, tmp_path):
    """``outputs/DATE/TIME`` from the clock, below the working directory: all three removed."""
    monkeypatch.chdir(tmp_path)
    code, _ = cli(monkeypatch, capsys, "optim.lr=inf")
    assert code == 1 and list(tmp_path.iterdir()) == []


def test_a_refused_command_removes_only_the_run_directory_it_was_given_outside_the_working_directory(
        monkeypatch, capsys, tmp_path):
    (tmp_path / "mine").mkdir()
    code, _ = cli(monkeypatch, capsys, "optim.lr=inf", f"hydra.run.dir={tmp_path / 'mine' / 'run'}")
    assert code == 1 and [p.name for p in tmp_path.iterdir()] == ["mine"] and not any((tmp_path / "mine").iterdir())


def test_a_refused_command_keeps_a_log_that_holds_something(monkeypatch, capsys, tmp_path):
    """A directory with nothing but a written train.log: someone's record, left as it was."""
    (tmp_path / "train.log").write_text("an earlier command's line\n")
    assert cli(monkeypatch, capsys, "optim.lr=inf", f"hydra.run.dir={tmp_path}")[0] == 1
    assert (tmp_path / "train.log").read_text().startswith("an earlier command's line\n")


def test_a_refused_command_run_in_its_own_directory_keeps_it(monkeypatch, capsys, tmp_path):
    """``hydra.run.dir=.``: the working directory is never removed, nor Hydra's log in it."""
    monkeypatch.chdir(tmp_path)
    assert cli(monkeypatch, capsys, "hydra.run.dir=.", "optim.lr=inf")[0] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["train.log"]


def test_a_rank_other_than_0_removes_nothing_of_the_directory_it_shares(monkeypatch, capsys, tmp_path):
    """Under torchrun every rank runs the app in one directory; Hydra's log there is rank 0's."""
    (tmp_path / "train.log").touch()
    monkeypatch.setenv("RANK", "1")
    assert cli(monkeypatch, capsys, "optim.lr=inf", f"hydra.run.dir={tmp_path}")[0] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["train.log"]


LAUNCH_PATHS = {  # every path's own way in: a multirun's launchers, and a rank's check before it starts
    "multirun": ["-m", "seed=0,1"],
    "submitit_local": ["-m", "hydra/launcher=submitit_local", "seed=0,1"],
    "submitit_slurm": ["-m", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2", "seed=0,1"],
    "torchrun_or_sbatch": ["--check"],  # what launch/torchrun.sh and launch/slurm.sbatch run first, as rank 0
}
LAUNCHED = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "0"}


@pytest.mark.parametrize("path", list(LAUNCH_PATHS))
@pytest.mark.parametrize("overrides", SINGLE, ids="|".join)
def test_every_bad_value_through_every_launch_path_is_one_line_before_anything_starts(monkeypatch, capsys, tmp_path,
                                                                                       path, overrides):
    """A multirun is checked whole before its sweep directory is made or a job submitted
    (``syncbn.launchers``), through any launcher; a launched rank's check as the direct path's."""
    monkeypatch.chdir(tmp_path)
    for name, value in (LAUNCHED.items() if path == "torchrun_or_sbatch" else ()):
        monkeypatch.setenv(name, value)
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    code, err = cli(monkeypatch, capsys, *LAUNCH_PATHS[path], *overrides, *dirs)
    assert code == 1 and err.count("\n") == 1 and err.startswith("syncbn.train: error: "), err
    assert any(named(override, err) for override in overrides), err
    assert list(tmp_path.iterdir()) == [], "nothing made, nothing submitted"


@pytest.mark.parametrize("key,value", [("tasks_per_node", "-1"), ("tasks_per_node", "0"), ("nodes", "0"),
                                       ("timeout_min", "0"), ("cpus_per_task", "-2"), ("gpus_per_node", "-1"),
                                       ("mem_gb", "-1")])
@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_a_submitit_launchers_bad_key_is_one_line_naming_it_before_anything_is_submitted(monkeypatch, capsys, tmp_path,
                                                                                        launcher, key, value):
    monkeypatch.chdir(tmp_path)
    code, err = cli(monkeypatch, capsys, "-m", f"hydra/launcher={launcher}", f"hydra.launcher.{key}={value}", "seed=0,1")
    assert code == 1 and err.splitlines() == [f"syncbn.train: error: hydra.launcher.{key} must be a whole number >= "
                                              f"{0 if key in ('gpus_per_node', 'mem_gb') else 1}, got {value}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path,args,launcher", [
    ("submitit", ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "seed=0,1"],
     "submitit (hydra.launcher.nodes x hydra.launcher.tasks_per_node) starts 2 ranks"),
    ("torchrun", ["--check"], "torchrun (--nnodes x --nproc-per-node) starts 2 ranks"),
    ("srun", ["--check"], "srun (the job's tasks: sbatch --nodes x --ntasks-per-node) starts 2 ranks"),
])
@pytest.mark.parametrize("nproc", ["1", "4"])
def test_a_dist_nproc_that_disagrees_with_the_launchers_world_size_is_refused_naming_both(monkeypatch, capsys,
                                                                                         tmp_path, path, args,
                                                                                         launcher, nproc):
    """Where a launcher decides the world size, a dist.nproc the command gives must be it."""
    monkeypatch.chdir(tmp_path)
    for name, value in ({**LAUNCHED, **({"SLURM_JOB_ID": "7"} if path == "srun" else {})}.items()
                        if path != "submitit" else ()):
        monkeypatch.setenv(name, value)
    code, err = cli(monkeypatch, capsys, *args, f"dist.nproc={nproc}")
    assert code == 1 and err.splitlines() == [
        f"syncbn.train: error: dist.nproc={nproc}, but {launcher}: the launcher decides the world size here; "
        "leave dist.nproc out or make it 2"]
    assert list(tmp_path.iterdir()) == []
    assert cli(monkeypatch, capsys, *args, "dist.nproc=2", "train.epochs=1", "data.train_size=100")[0] == 0 \
        or path == "submitit", "the same world size is accepted"
