import contextlib
import os
import random
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from syncbn.training import checkpoint
from syncbn.training.checkpoint import CheckpointError
from syncbn.training.config import (Config, DataConfig, DistConfig, FaultConfig, NormConfig, OptimConfig, SweepConfig,
                           TrainConfig)


def _parts(step: int) -> dict:
    """Something that has every part of a checkpoint, told apart by ``step``."""
    return {part: {} for part in checkpoint.PARTS} | {"progress": {"step": step}}


def test_save_keeps_the_previous_checkpoint_and_load_reads_the_latest(tmp_path):
    checkpoint.save(tmp_path, _parts(1))
    checkpoint.save(tmp_path, _parts(2))
    assert checkpoint.load(tmp_path) == _parts(2)
    assert torch.load(tmp_path / checkpoint.PREVIOUS, weights_only=True) == _parts(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([checkpoint.LATEST, checkpoint.PREVIOUS])


def test_a_crash_while_saving_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, _parts(1))

    def dies_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, _parts(2))
    assert checkpoint.load(tmp_path) == _parts(1)


def test_between_the_two_renames_the_previous_checkpoint_is_used(tmp_path):
    checkpoint.save(tmp_path, _parts(1))
    (tmp_path / checkpoint.LATEST).rename(tmp_path / checkpoint.PREVIOUS)
    assert checkpoint.load(tmp_path) == _parts(1)


def test_a_directory_without_checkpoint_has_nothing_to_resume(tmp_path):
    assert checkpoint.load(tmp_path) is None


def test_rng_states_round_trip():
    states = checkpoint.rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()
    checkpoint.restore_rng_states(states)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


CONFIG = Config(norm=NormConfig(name="syncbn"), optim=OptimConfig(name="sgd"), data=DataConfig(name="mnist5k"))


def _signature(config: Config = CONFIG, world_size: int = 2, model: nn.Module | None = None) -> dict:
    return checkpoint.signature(config, world_size, model or nn.Linear(3, 4))


@pytest.mark.parametrize("change,message", [
    (dict(world_size=4), "world size 2 there, 4 here"),
    (dict(config=replace(CONFIG, norm=NormConfig(name="bn"))), "norm.name=syncbn there, bn here"),
    (dict(config=replace(CONFIG, seed=1)), "seed=0 there, 1 here"),
    (dict(config=replace(CONFIG, optim=OptimConfig(name="adam", lr=0.5))), "optim.lr=0.01 there, 0.5 here; optim.name=sgd there, adam here"),
    (dict(config=replace(CONFIG, train=TrainConfig(dtype="float64", global_batch_size=50))),
     "train.dtype=float32 there, float64 here; train.global_batch_size=100 there, 50 here"),
    (dict(config=replace(CONFIG, data=DataConfig(name="mnist5k", train_size=2000))), "data.train_size=1000 there, 2000 here"),
    (dict(model=nn.Linear(3, 5)), r"another shape \(bias: \(4,\) there, \(5,\) here\)"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_every_difference(tmp_path, change, message):
    state = {"signature": _signature()}
    with pytest.raises(CheckpointError, match=re.escape(message) if "shape" not in message else message):
        checkpoint.check_compatible(state, _signature(**change), tmp_path)
    checkpoint.check_compatible(state, _signature(), tmp_path)


def test_what_may_change_on_resume_is_how_long_how_often_and_where():
    allowed = replace(CONFIG, train=TrainConfig(epochs=50, checkpoint_every_steps=3, eval_batch_size=10),
                      dist=DistConfig(timeout_s=9, max_restarts=2), fault=FaultConfig(kill_rank=1, kill_at_step=3),
                      data=DataConfig(name="mnist5k", root="elsewhere", download=False))
    assert checkpoint.settings(allowed) == checkpoint.settings(CONFIG)
    assert {"seed", "optim.lr", "model.weight_scale", "model.dropout", "norm.eps", "train.dtype",
            "train.global_batch_size", "data.train_size", "data.split_seed"} <= checkpoint.settings(CONFIG).keys()


# Written out here, not read from checkpoint.MAY_CHANGE: the test states the policy on its own.
KEYS_THAT_MAY_CHANGE = {
    "train.epochs", "train.resume", "train.checkpoint_every_steps", "train.eval_batch_size", "train.compile",
    "dist.nproc", "dist.backend", "dist.device", "dist.timeout_s", "dist.max_restarts",
    "data.root", "data.download", "fault.kill_rank", "fault.kill_at_step", "study.max_real_ranks", "logger.name",
}


def _every_key(config: Config) -> dict:
    return checkpoint._flatten(asdict(config))


def _another(value):
    """A value of the same kind that differs from ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    return [0.5] if value is None else None


def test_the_keys_that_must_match_are_every_key_but_how_long_how_often_and_where():
    every = _every_key(CONFIG)
    assert KEYS_THAT_MAY_CHANGE <= every.keys()
    assert checkpoint.settings(CONFIG).keys() == every.keys() - KEYS_THAT_MAY_CHANGE
    assert {"sweep.weight_scales", "sweep.norms", "sweep.seeds"} <= checkpoint.settings(CONFIG).keys()


@pytest.mark.parametrize("key", sorted(_every_key(CONFIG)))
def test_changing_any_key_is_refused_naming_it_unless_it_may_change(tmp_path, key):
    state = {"signature": _signature()}
    flat = _every_key(CONFIG)
    changed = dict(flat, **{key: _another(flat[key])})
    expected = dict(_signature(), settings={k: v for k, v in changed.items() if k in checkpoint.settings(CONFIG)})
    if key in KEYS_THAT_MAY_CHANGE:
        checkpoint.check_compatible(state, expected, tmp_path)
        return
    with pytest.raises(CheckpointError) as refusal:
        checkpoint.check_compatible(state, expected, tmp_path)
    assert str(refusal.value) == (
        f"the checkpoint in {tmp_path} was trained with other settings: {key}={flat[key]} there, {changed[key]} here. "
        "Keep them to resume, or use another run directory (hydra.run.dir=...) or train.resume=false")


@pytest.mark.parametrize("sweep", [
    SweepConfig(weight_scales=[0.1, 0.2]), SweepConfig(norms=["syncbn", "none"]), SweepConfig(seeds=[0, 1]),
])
def test_a_sweep_resumes_only_as_the_same_sweep(tmp_path, sweep):
    """Its members are its identity: another list of scales, norms or seeds would relabel the networks."""
    state = {"signature": _signature(replace(CONFIG, sweep=sweep))}
    for other in (CONFIG, replace(CONFIG, sweep=replace(sweep, **{k: v[::-1] for k, v in asdict(sweep).items() if v}))):
        with pytest.raises(CheckpointError, match="sweep"):
            checkpoint.check_compatible(state, _signature(other), tmp_path)


@pytest.mark.parametrize("found,said", [
    ({"settings": {}}, "checkpoint format 1 there (an older syncbn)"),
    ({"format": 1, "world_size": 2, "shapes": {}}, "checkpoint format 1 there (an older syncbn)"),
    ({"format": checkpoint.FORMAT + 1}, f"checkpoint format {checkpoint.FORMAT + 1} there (a newer syncbn)"),
], ids=["format-1-without-the-key", "format-1", "newer"])
def test_a_checkpoint_of_another_format_is_refused_in_one_line_whatever_else_it_lacks(tmp_path, found, said):
    with pytest.raises(CheckpointError) as refusal:
        checkpoint.check_compatible({"signature": found}, _signature(), tmp_path)
    assert str(refusal.value) == (
        f"the checkpoint in {tmp_path} was trained with other settings: {said}, {checkpoint.FORMAT} here. Keep "
        "them to resume, or use another run directory (hydra.run.dir=...) or train.resume=false")


def test_a_model_of_another_shape_is_named_by_its_first_differing_tensor_by_name_and_only_when_settings_agree(tmp_path):
    state = {"signature": _signature(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))}
    with pytest.raises(CheckpointError, match=r": a model of another shape \(1.bias: \(2,\) there, \(3,\) here\)\."):
        checkpoint.check_compatible(state, _signature(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))), tmp_path)
    with pytest.raises(CheckpointError, match=r": a model of another shape \(2.bias: \(5,\) there, None here\)\."):
        checkpoint.check_compatible(
            {"signature": _signature(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 5)))},
            _signature(model=nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))), tmp_path)
    with pytest.raises(CheckpointError, match=r"settings: seed=0 there, 1 here\. Keep"):  # the settings say more
        checkpoint.check_compatible(state, _signature(replace(CONFIG, seed=1), model=nn.Linear(3, 4)), tmp_path)


def _state(epoch: int, *last_epoch_diverged: bool) -> dict:
    history = [dict(epoch=1, diverged=False) for _ in last_epoch_diverged]
    history += [dict(epoch=epoch - 1, diverged=d) for d in last_epoch_diverged]
    return {"progress": {"epoch": epoch, "history": history}}


@pytest.mark.parametrize("state,epochs,why", [
    (_state(4, False), 5, None),
    (_state(5, False), 5, None),  # 4 trained of 5
    (_state(6, False), 5, "{run_dir} has trained 5 epochs of train.epochs=5: nothing to train (raise train.epochs to go on)"),
    (_state(6, False), 6, None),
    (_state(9, False), 5, "{run_dir} has trained 8 epochs of train.epochs=5: nothing to train (raise train.epochs to go on)"),
    ({"progress": {"epoch": 1, "history": []}}, 1, None),
    (_state(3, True), 5, "{run_dir} holds a run that diverged at epoch 2: nothing to train (train.resume=false starts over)"),
    (_state(3, True, True), 5,
     "{run_dir} holds a sweep whose every network diverged, the last at epoch 2: nothing to train (train.resume=false starts over)"),
    (_state(3, True, False), 5, None),  # one network still trains
    (_state(3, False, True), 5, None),
])
def test_nothing_left_to_train_when_done_or_every_network_diverged(tmp_path, state, epochs, why):
    assert checkpoint.nothing_left(state, epochs, tmp_path) == (why and why.format(run_dir=tmp_path))


def test_a_sweep_whose_last_networks_diverged_in_an_earlier_epoch_is_judged_by_its_last_epoch(tmp_path):
    """Members that diverged earlier are not in the later epochs' records: only the last epoch's count."""
    history = [dict(epoch=1, diverged=True), dict(epoch=1, diverged=False), dict(epoch=2, diverged=True)]
    state = {"progress": {"epoch": 3, "history": history}}
    assert checkpoint.nothing_left(state, 5, tmp_path) == (
        f"{tmp_path} holds a run that diverged at epoch 2: nothing to train (train.resume=false starts over)")


def test_a_run_directory_held_by_a_live_run_is_refused_naming_the_holder(tmp_path):
    with checkpoint.claim(tmp_path / "run"):
        assert (tmp_path / "run" / checkpoint.LOCK).read_text() == f"pid {os.getpid()}\n"
        with pytest.raises(CheckpointError) as refusal:
            with checkpoint.claim(tmp_path / "run"):
                pass
        assert str(refusal.value) == (f"{tmp_path / 'run'} belongs to a run still going (pid {os.getpid()}); wait for it "
                                      "or pick another hydra.run.dir")
    with checkpoint.claim(tmp_path / "run"):  # let go when the run ends
        pass


@pytest.mark.parametrize("content", [b"not a checkpoint", b"PK\x03\x04 not a zip", b""], ids=["bytes", "zip", "empty"])
def test_an_unreadable_checkpoint_names_the_file_and_the_first_line_of_why(tmp_path, content):
    """The first line of torch's own error, or its type where it says nothing (an empty file)."""
    path = tmp_path / checkpoint.LATEST
    path.write_bytes(content)
    with pytest.raises(Exception) as torchs:
        torch.load(path, weights_only=True)
    why = str(torchs.value).strip().splitlines()[0] if str(torchs.value).strip() else type(torchs.value).__name__
    with pytest.raises(CheckpointError) as refusal:
        checkpoint.load(tmp_path)
    assert str(refusal.value) == f"{path} cannot be read ({why}); move it away or pass train.resume=false"
    assert content or why == "EOFError"


def _old_run(run_dir):
    """A run directory as a finished sweep leaves it, with the files that are not part of the run."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("optim: {lr: 0.01}\n")
    for name in (checkpoint.LATEST, checkpoint.PREVIOUS, "metrics.jsonl", "summary.csv", "train.log", checkpoint.LOCK):
        (run_dir / name).write_text(name)
    return {".hydra", checkpoint.LATEST, checkpoint.PREVIOUS, "metrics.jsonl", "summary.csv"}


def test_a_fresh_start_moves_the_whole_run_aside_and_nothing_else(tmp_path):
    run = _old_run(tmp_path)
    moved = checkpoint.set_aside(tmp_path)
    assert moved.parent == tmp_path / checkpoint.REPLACED and {p.name for p in moved.iterdir()} == run
    assert (moved / ".hydra" / "config.yaml").read_text() == "optim: {lr: 0.01}\n"
    assert {p.name for p in tmp_path.iterdir()} == {"train.log", checkpoint.LOCK, checkpoint.REPLACED}
    assert checkpoint.set_aside(tmp_path) is None, "nothing left to move"
    _old_run(tmp_path / "again")
    assert checkpoint.set_aside(tmp_path / "again") != moved


@pytest.mark.parametrize("renames", range(1, 5))
def test_a_fresh_start_killed_while_moving_leaves_no_checkpoint_beside_what_is_not_its_run(tmp_path, monkeypatch, renames):
    """Whatever is left after ``renames`` moves is part of the old run that a rerun resumes from its
    latest checkpoint, refuses (metrics, no checkpoint) or moves on: the previous checkpoint never
    stays without the latest, to be resumed in its place."""
    run = _old_run(tmp_path)
    original, done = os.rename, []

    def dies_after(source, target):
        if len(done) == renames:
            raise KeyboardInterrupt
        done.append(source)
        original(source, target)

    monkeypatch.setattr(os, "rename", dies_after)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.set_aside(tmp_path)
    monkeypatch.undo()
    left = {p.name for p in tmp_path.iterdir()} & run
    assert checkpoint.LATEST in left or checkpoint.PREVIOUS not in left
    if checkpoint.LATEST not in left:
        with pytest.raises(CheckpointError, match="no checkpoint to continue them from") if "metrics.jsonl" in left \
                else contextlib.nullcontext():
            checkpoint.require_checkpoint_for(tmp_path)
    checkpoint.set_aside(tmp_path)
    assert not {p.name for p in tmp_path.iterdir()} & run


def test_metrics_without_a_checkpoint_are_refused_and_an_empty_or_missing_log_is_not(tmp_path):
    checkpoint.require_checkpoint_for(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    checkpoint.require_checkpoint_for(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path))} holds 2 line\(s\) of metrics.jsonl but no "):
        checkpoint.require_checkpoint_for(tmp_path)


@pytest.mark.parametrize("content,without", [
    ({}, "dict without signature, model, optimizer, progress, rng"),
    ([1, 2], "list without signature, model, optimizer, progress, rng"),
    (torch.zeros(2), "Tensor without signature, model, optimizer, progress, rng"),
    ({part: {} for part in checkpoint.PARTS if part != "rng"}, "dict without rng"),
    ({part: {} for part in checkpoint.PARTS if part not in ("signature", "model")}, "dict without signature, model"),
])
def test_a_torch_file_that_is_not_a_checkpoint_is_refused_in_one_line_naming_what_it_lacks(tmp_path, content, without):
    torch.save(content, tmp_path / checkpoint.LATEST)
    with pytest.raises(CheckpointError) as refusal:
        checkpoint.load(tmp_path)
    assert str(refusal.value) == (f"{tmp_path / checkpoint.LATEST} is a torch file but not a syncbn checkpoint (a "
                                  f"{without}); move it away or pass train.resume=false")


def _multirun(task: list[str], params: dict | None = None):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": {"params": params}}})


def test_a_sweep_is_its_overrides_and_sweeper_lists_less_what_may_change_on_resume():
    sweep = checkpoint._sweep
    base = sweep(_multirun(["model.weight_scale=0.1,0.05", "train.epochs=2"], {"norm": "syncbn,none"}))
    assert base == ["model.weight_scale=0.1,0.05", "norm=syncbn,none"]
    assert sweep(_multirun(["train.epochs=9", "+dist.timeout_s=5", "model.weight_scale=0.1,0.05"],
                           {"norm": "syncbn,none"})) == base
    assert sweep(_multirun(["model.weight_scale=0.1,0.05"], {"norm": "syncbn"})) != base
    assert sweep(_multirun(["model.weight_scale=0.1,0.05", "seed=1"], {"norm": "syncbn,none"})) != base
    assert sweep(_multirun(["model.weight_scale=0.1,0.05"])) == ["model.weight_scale=0.1,0.05"]


def test_a_checkpoint_that_cannot_be_written_is_named_and_leaves_the_last_one_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE makes a large write fail (EFBIG, as a full disk gives ENOSPC); Python ignores SIGXFSZ."""
    import resource

    checkpoint.save(tmp_path, _parts(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        with pytest.raises(CheckpointError) as refusal:
            checkpoint.save(tmp_path, _parts(2) | {"model": torch.zeros(50_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(refusal.value) == (f"cannot write the checkpoint {tmp_path / '.checkpoint.pt.tmp'} (File too large); "
                                  "the last complete one is kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LATEST]
    assert checkpoint.load(tmp_path) == _parts(1)
