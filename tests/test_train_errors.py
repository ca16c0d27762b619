"""What ``python -m syncbn.train`` says when it cannot or need not train, and when it is
interrupted: one line and an exit status, before anything starts or changes; run in this process."""

from __future__ import annotations

import signal
import sys
from dataclasses import replace

import pytest
import torch
from app import cli, compose_config, read_metrics
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from syncbn import endings, train
from syncbn.training import checkpoint, loop
from syncbn.training.checkpoint import CheckpointError
from syncbn.training.config import ConfigError
from syncbn.training.resume import nothing_to_resume
from syncbn.experiments.batch_size import main as study_main
from syncbn.experiments.weight_scale import main as plot_main


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=abc"], "Error merging override train.epochs=abc Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.epoch=3"], "Key 'epoch' not in 'TrainConfig'"),
    (["+train.foo=1"], "unknown config key train.foo"),
    (["norm=batchnorm"], "Could not find 'norm/batchnorm' Available options in 'norm': bn groupnorm layernorm none syncbn"),
    (["optim=rmsprop"], "Could not find 'optim/rmsprop'"),
    (["data=imagenet"], "Could not find 'data/imagenet'"),
    (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
    (["train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["model.weight_scale=0"], "model.weight_scale must be > 0, got 0.0"),
    (["model.hidden=[]"], "model.hidden must list at least one hidden layer width"),
    (["model.hidden=[100000000]"], "of a model of 79,700,000,030 parameters (model.hidden=[100000000]) need about"),
    (["model=cnn", "model.hidden=[8,8,8,8,8]"], "model.hidden may list at most 4 widths, got 5"),
    (["norm.eps=inf"], "norm.eps must be a finite number, got inf"),  # was: trained at chance, exit 0
    (["dist.timeout_s=inf"], "dist.timeout_s must be a finite number, got inf"),
    (["dist.timeout_s=1e300"], "dist.timeout_s must be at most 2592000 (30 days), got 1e+300"),
    (["dist.nproc=3"], "train.global_batch_size=100 is not divisible by the world size 3"),
    (["dist.nproc=4", "train.global_batch_size=2"], "train.global_batch_size=2 is smaller than the world size 4"),
    (["dist.nproc=0"], "dist.nproc must be >= 1, got 0"),
    (["train.dtype=float16"], "train.dtype must be one of float32, float64, got 'float16'"),
    (["model.dropout=1"], "model.dropout must be in [0, 1), got 1.0"),
    (["norm=groupnorm", "norm.num_groups=7"], "norm.num_groups=7 must divide every width of model.hidden"),
    (["norm=groupnorm", "norm.num_groups=0"], "norm.num_groups must be >= 1, got 0"),
    (["norm.num_groups=0"], "norm.num_groups must be >= 1, got 0"),  # a value of its own, used or not
    (["norm.eps=-1"], "norm.eps must be > 0, got -1.0"),
    (["norm.momentum=5"], "norm.momentum must be in [0, 1]"),
    (["train.eval_batch_size=0"], "train.eval_batch_size must be >= 1, got 0"),
    (["optim.momentum=-1"], "optim.momentum must be >= 0, got -1.0"),
    (["optim.weight_decay=-1"], "optim.weight_decay must be >= 0, got -1.0"),
    (["model.name=foo"], "model.name must be one of mlp, cnn, got 'foo'"),
    (["dist.backend=foo"], "dist.backend must be one of gloo, nccl, got 'foo'"),
    (["train.global_batch_size=1"], "gives per-rank batches of 1: norm=syncbn would normalize a single sample"),
    (["data.train_size=1001"], "gives per-rank batches of 1, 100: norm=syncbn would normalize a single sample"),
    (["norm=bn", "dist.nproc=2", "train.global_batch_size=2"], "over 2 rank(s) gives per-rank batches of 1: norm=bn"),
    (["norm=bn", "norm.ghost_slices=4", "data.train_size=1010"], "batches of 10, 100: norm.ghost_slices=4 must divide"),
    (["fault.kill_rank=5", "fault.kill_at_step=3", "dist.nproc=2"], "fault.kill_rank=5 is not a rank of this run (0 to 1)"),
    (["fault.kill_rank=1"], "fault.kill_rank and fault.kill_at_step go together"),
    (["data.train_size=5000"], "data.train_size=5000 is larger than the 4999 training images of data=mnist5k"),
    (["dist.backend=nccl"], "dist.backend=nccl needs CUDA devices"),
    (["+experiment=batch_size_study_per_run", "study.per_device_batch=48"], "study.per_device_batch=48 must divide train.global_batch_size=64"),
    (["+experiment=batch_size_study", "study.per_device_batches=[64,48]"], "study.per_device_batches=48 must divide train.global_batch_size=64"),
    (["+experiment=batch_size_study", "study.models=[mlp,vit]"], "study.models: each must be one of mlp, cnn, got 'vit'"),
    (["+experiment=batch_size_study", "data.train_size=4000"], "needs data.train_size divisible by train.global_batch_size=64"),
    (["+experiment=batch_size_study_per_run", "dist.nproc=2"], "study.per_device_batch sets the world size itself: leave dist.nproc at 1"),
    (["+experiment=batch_size_study", "dist.nproc=2"], "study.per_device_batches sets the world size itself: leave dist.nproc at 1"),
    (["sweep.norms=[syncbn,batchnorm]"], "sweep.norms: each must be one of syncbn, bn, none, layernorm, groupnorm, got 'batchnorm'"),
    (["sweep.weight_scales=[]"], "sweep.weight_scales must list at least one value, or be null"),
    (["sweep.seeds=[0,1,0]"], "sweep.seeds lists a value twice: [0, 1, 0]"),
    (["sweep.weight_scales=[0.1,-1]"], "sweep.weight_scales must all be > 0, got [0.1, -1.0]"),
    (["sweep.weight_scales=abc"], "sweep.weight_scales"),
    (["sweep.seeds=[a]"], "sweep.seeds"),
    (["+experiment=weight_scale_sweep", "model=cnn", "sweep.bn_slices=[4]"], "sweep.bn_slices sizes the slices of per-rank BatchNorm members (norm=bn or sweep.norms with bn), or the ranks of sweep.bn_groups: the job has neither"),
    (["sweep.seeds=[0,1]", "norm=bn", "norm.ghost_slices=2"], "norm.ghost_slices emulates per-rank BatchNorm in a single run"),
    (["+experiment=batch_size_study_per_run", "sweep.seeds=[0,1]"], "the batch-size study (study.per_device_batch) trains single runs"),
    (["+experiment=batch_size_study", "sweep.seeds=[0,1]"], "study.per_device_batches makes its jobs' members itself"),
    (["sweep.norms=[none,groupnorm]", "norm.num_groups=7"], "norm.num_groups=7 must divide every width"),
    (["sweep.norms=[none,bn]", "dist.nproc=2", "train.global_batch_size=2"], "per-rank batches of 1: norm=bn would normalize"),
])
def test_bad_input_is_one_line_naming_it(monkeypatch, capsys, tmp_path, overrides, message):
    code, err = cli(monkeypatch, capsys, *overrides, f"hydra.run.dir={tmp_path}")
    assert code == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("syncbn.train: error: "), err
    assert message in err
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("compilers,level,problem", [
    ((), None, "needs a C++ compiler for torch.compile's inductor (c++, g++ or clang++ on PATH): none found"),
    (("c++",), None, None), (("g++",), None, None), (("clang++",), None, None), (("g++",), "", None),
    (("c++",), "default", "cannot build with ATEN_CPU_CAPABILITY=default: inductor's C++ uses ATen's vector code, "
                          "which that level leaves out"),
    (("c++",), "avx2", "is not reliable with ATEN_CPU_CAPABILITY=avx2: inductor's C++ does not follow it (unset it to "
                       "compile)"),
    ((), "avx2", "needs a C++ compiler for torch.compile's inductor (c++, g++ or clang++ on PATH): none found"),
])
def test_compiling_is_refused_without_a_compiler_or_with_a_cpu_level_set(monkeypatch, tmp_path, compilers, level,
                                                                         problem):
    """Any one of the three compiler names on PATH is enough; an empty ATEN_CPU_CAPABILITY is unset."""
    for name in compilers:
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    if level is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", level)
    assert loop.cannot_compile() == problem


@pytest.mark.parametrize("cause,message", [
    ("no C++ compiler", "needs a C++ compiler for torch.compile's inductor (c++, g++ or clang++ on PATH): none found"),
    ("ATen's portable kernels", "cannot build with ATEN_CPU_CAPABILITY=default: inductor's C++ uses ATen's vector code, "
                                "which that level leaves out"),
])
def test_compile_where_inductor_cannot_build_is_one_line(monkeypatch, capsys, tmp_path, cause, message):
    if cause == "no C++ compiler":
        monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    code, err = cli(monkeypatch, capsys, "train.compile=true", f"hydra.run.dir={tmp_path}")
    assert code == 1 and err.strip() == f"syncbn.train: error: train.compile=true {message}"


def test_a_run_directory_that_cannot_be_made_is_one_line(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    code, err = cli(monkeypatch, capsys, f"hydra.run.dir={tmp_path / 'file' / 'run'}")
    assert code == 1 and err.strip().splitlines() == [err.strip()], err
    assert err.startswith("syncbn.train: error: ") and str(tmp_path / "file") in err


@pytest.mark.parametrize("tool", [plot_main, study_main])
def test_redrawing_a_directory_without_runs_is_one_line(capsys, tmp_path, tool):
    with pytest.raises(SystemExit) as exit_:
        tool([str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.strip().splitlines() == [err.strip()] and str(tmp_path / "missing") in err


def test_missing_or_corrupt_mnist_files_are_one_line(monkeypatch, capsys, tmp_path, tiny_mnist):
    root, _ = tiny_mnist
    code, err = cli(monkeypatch, capsys, "data=mnist", "data.download=false", f"data.root={tmp_path / 'none'}",
                    f"hydra.run.dir={tmp_path / 'a'}")
    assert code == 1 and f"full MNIST is not in {tmp_path / 'none' / 'MNIST' / 'raw'}" in err and "data=mnist5k" in err
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:5])
    code, err = cli(monkeypatch, capsys, "data=mnist", "data.download=false", f"data.root={root}",
                    "data.train_size=10", f"hydra.run.dir={tmp_path / 'b'}")
    assert code == 1 and f"{labels} is truncated or corrupt" in err and len(err.strip().splitlines()) == 1


def test_resume_with_other_settings_is_refused_in_one_line_before_anything_changes(monkeypatch, capsys, tmp_path):
    run_dir = f"hydra.run.dir={tmp_path}"
    assert cli(monkeypatch, capsys, "train.epochs=1", "model.hidden=[20]", run_dir)[0] == 0
    recorded = (tmp_path / ".hydra" / "config.yaml").read_text()
    for overrides, named in [
        (["optim.lr=0.5"], "optim.lr=0.01 there, 0.5 here"),
        (["seed=1", "model.weight_scale=0.5"], "model.weight_scale=0.1 there, 0.5 here; seed=0 there, 1 here"),
        (["optim=adam"], "optim.name=sgd there, adam here"),
        (["model.hidden=[30]"], "model.hidden=[20] there, [30] here"),
        (["dist.nproc=2"], "world size 1 there, 2 here"),
    ]:
        code, err = cli(monkeypatch, capsys, "train.epochs=2", "model.hidden=[20]", *overrides, run_dir)
        assert code == 1 and err.strip().splitlines() == [err.strip()], err
        assert f"the checkpoint in {tmp_path} was trained with other settings: " in err and named in err
    assert len(read_metrics(tmp_path)) == 1 and (tmp_path / ".hydra" / "config.yaml").read_text() == recorded


def test_a_finished_or_diverged_run_says_so_and_trains_nothing(monkeypatch, capsys, tmp_path):
    done, diverged = tmp_path / "done", tmp_path / "diverged"
    assert cli(monkeypatch, capsys, "train.epochs=1", "model.hidden=[20]", f"hydra.run.dir={done}")[0] == 0
    assert cli(monkeypatch, capsys, "train.epochs=1", "model.weight_scale=1.0", "norm=none", "norm.eps=1e-6",
               f"hydra.run.dir={diverged}")[0] == 0
    assert read_metrics(diverged)[0]["diverged"]
    for overrides, run_dir, said in [
        (["train.epochs=1", "model.hidden=[20]"], done, "has trained 1 epochs of train.epochs=1: nothing to train"),
        (["train.epochs=3", "model.weight_scale=1.0", "norm=none", "norm.eps=1e-6"], diverged,
         "holds a run that diverged at epoch 1: nothing to train"),
    ]:
        code, err = cli(monkeypatch, capsys, *overrides, f"hydra.run.dir={run_dir}")
        assert code == 0 and len(err.strip().splitlines()) == 1 and err.startswith(f"syncbn.train: {run_dir} {said}"), err
        assert len(read_metrics(run_dir)) == 1


def test_a_fresh_start_does_not_read_the_checkpoint_it_will_replace(tmp_path):
    """train.resume=false: whatever lies in the directory (here a file torch cannot read) is not
    looked at; with resume it is, and refused in one line."""
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    config = compose_config("train.resume=false")
    assert nothing_to_resume(config, 1, tmp_path) is None
    with pytest.raises(CheckpointError, match="checkpoint.pt cannot be read"):
        nothing_to_resume(replace(config, train=replace(config.train, resume=True)), 1, tmp_path)


def failed_child(exitcode: int) -> ChildFailedError:
    return ChildFailedError("syncbn.train", {1: ProcessFailure(local_rank=1, pid=1, exitcode=exitcode, error_file="")})


@pytest.mark.parametrize("error,received", [
    (KeyboardInterrupt(), signal.SIGINT),
    (SignalException("", sigval=signal.SIGTERM), signal.SIGTERM),
    (failed_child(-signal.SIGTERM), signal.SIGTERM),
    (failed_child(-signal.SIGINT), signal.SIGINT),
    (failed_child(signal.SIGTERM), None),  # a rank that exited with status 15 was not signalled
    (failed_child(-signal.SIGKILL), None),  # killed outright: a failure, not an interrupt
    (failed_child(1), None),
    (RuntimeError("boom"), None),
])
def test_only_sigint_and_sigterm_count_as_interrupts_and_a_rank_killed_by_one_is_one(error, received):
    assert endings.interrupting_signal(error) == received


def test_where_an_interrupted_run_stopped_is_said_for_each_case(tmp_path):
    assert endings.where_training_stopped(None, "rerun") == "before training started"
    assert endings.where_training_stopped(tmp_path, "rerun") == f"before the first checkpoint; {tmp_path} has nothing to resume"
    checkpoint.save(tmp_path, {part: {} for part in checkpoint.PARTS} | {"progress": {"epoch": 3, "step": 7}})
    assert endings.where_training_stopped(tmp_path, "rerun it") == "at epoch 3, step 7 (the last checkpoint); rerun it"


@pytest.mark.parametrize("debug", [False, True])
def test_an_interrupt_is_one_line_and_its_status_unless_debugging(monkeypatch, capsys, tmp_path, debug):
    monkeypatch.setenv("SYNCBN_DEBUG", "1" if debug else "0")
    with pytest.raises(KeyboardInterrupt if debug else SystemExit) as stopped:
        with endings.interrupts_in_one_line(tmp_path, "rerun"):
            raise KeyboardInterrupt
    if not debug:
        assert stopped.value.code == 130
        assert capsys.readouterr().err == (f"syncbn.train: interrupted by SIGINT before the first checkpoint; {tmp_path} "
                                           "has nothing to resume\n")
    with pytest.raises(RuntimeError, match="not an interrupt"):
        with endings.interrupts_in_one_line(tmp_path, "rerun"):
            raise RuntimeError("not an interrupt")


def test_debug_shows_the_traceback_instead_of_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SYNCBN_DEBUG", "0")  # cli sets it to 1; monkeypatch puts back the test's state
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        cli(monkeypatch, capsys, "--debug", "optim.lr=0", f"hydra.run.dir={tmp_path}")
    assert "--debug" not in sys.argv


def test_a_sweep_directory_holds_one_sweep_and_a_rerun_of_it_continues_each_run(monkeypatch, capsys, tmp_path):
    """Another sweep into it (other scales, another learning rate) is refused before Hydra rewrites
    multirun.yaml; the same sweep with more epochs trains each of its runs on."""
    common = ["-m", "data.train_size=100", "model.hidden=[20]", f"hydra.sweep.dir={tmp_path}"]
    assert cli(monkeypatch, capsys, *common, "train.epochs=1", "model.weight_scale=0.1,0.05")[0] == 0
    record = (tmp_path / "multirun.yaml").read_text()
    for other, there, here in [(["model.weight_scale=0.5,0.05"], "model.weight_scale=0.1,0.05", "model.weight_scale=0.5,0.05"),
                               (["model.weight_scale=0.1,0.05", "optim.lr=0.5"], "nothing", "optim.lr=0.5")]:
        code, err = cli(monkeypatch, capsys, *common, "train.epochs=1", *other)
        assert code == 1 and err.splitlines() == [f"syncbn.train: error: {tmp_path} holds another sweep ({there} there, "
                                                  f"{here} here): rerun that sweep to resume it, or pick another hydra.sweep.dir"]
        assert (tmp_path / "multirun.yaml").read_text() == record
    assert cli(monkeypatch, capsys, *common, "train.epochs=2", "model.weight_scale=0.1,0.05")[0] == 0
    assert [[r["epoch"] for r in read_metrics(tmp_path / job)] for job in ("0", "1")] == [[1, 2], [1, 2]]


@pytest.mark.parametrize("path", ["/runs/plain-1.0", "/my runs/a b", "/it's/here", '/say "x"/y', "/a=b,c/[d]", "/back\\slash",
                                  "/ends in\\", "/x\\'y z"])
def test_the_resume_hint_is_one_shell_word_that_hydra_reads_back_as_the_path(path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    word = train.override_for("hydra.run.dir", path)
    [override] = shlex.split(word)
    assert OverridesParser.create().parse_override(override).value() == path


def test_an_empty_run_or_sweep_directory_is_refused_instead_of_writing_into_the_working_one(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err = cli(monkeypatch, capsys, "hydra.run.dir=", "train.epochs=1")
    assert code == 1 and err.splitlines() == ["syncbn.train: error: hydra.run.dir is empty: name a directory for the "
                                              "run, or leave the key out (outputs/DATE/TIME)"]
    code, err = cli(monkeypatch, capsys, "-m", "hydra.sweep.dir=", "train.epochs=1")
    assert code == 1 and err.splitlines() == ["syncbn.train: error: hydra.sweep.dir is empty: name a directory for the "
                                              "sweep, or leave the key out"]
    assert {p.name for p in tmp_path.iterdir()} <= {"train.log"}, "no run, no multirun.yaml, in the working directory"


GLOO = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                    "peer [127.0.0.1]:15554. This is typically caused by a remote worker crashing.")


def wrapped_by_the_layer() -> RuntimeError:
    from syncbn import comm

    error = comm._failed("forward", 2, GLOO)
    error.__cause__ = GLOO
    return error


@pytest.mark.parametrize("error,line", [
    (torch.distributed.DistNetworkError("The client socket has timed out after 15000ms while trying to connect to "
                                        "(vm, 29532)."),
     "DistNetworkError: The client socket has timed out after 15000ms while trying to connect to (vm, 29532)."),
    (torch.distributed.DistStoreError("Timed out after 16 seconds waiting for clients. 1/2 clients joined."),
     "DistStoreError: Timed out after 16 seconds waiting for clients. 1/2 clients joined."),
    (GLOO, f"RuntimeError: {GLOO}"),
    (wrapped_by_the_layer(), f"RuntimeError: {wrapped_by_the_layer()}"),
], ids=["network", "store", "gloo", "the-layers"])
def test_a_rank_whose_process_group_failed_says_so_in_one_line(monkeypatch, capsys, error, line):
    """Under srun each task reports its own failure: a peer stopped or died in the start-up (the store,
    DDP's first collective) or in a step was 60 to 100 lines of traceback (found by the chaos run)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(SystemExit) as ended, endings.one_line_errors():
        raise error
    assert ended.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"syncbn.train: error: rank 1: the process group failed (a peer stopped, died or never joined within "
        f"dist.timeout_s): {line}"]


def test_a_runtime_error_of_the_ranks_own_code_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"), endings.one_line_errors():
        raise RuntimeError("a bug in transport/gloo naming")
