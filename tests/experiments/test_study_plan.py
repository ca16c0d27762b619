"""How the batch-size study executes each per-device batch: one run's layout (the per-run study)
and the fused study's jobs, and the studies that cannot work."""

import json

import pytest
from app import compose_config

from syncbn.experiments import study_plan
from syncbn.training.config import Config, ConfigError


def study_config(*overrides: str) -> Config:
    return compose_config("+experiment=batch_size_study_per_run", *overrides)


@pytest.mark.parametrize("norm,per_device_batch,max_real_ranks,world_size,execution,nproc,ghost_slices", [
    ("syncbn", 64, 2, 1, "real", 1, None),
    ("bn", 32, 2, 2, "real", 2, None),
    ("bn", 16, 2, 4, "ghost", 1, 4),
    ("bn", 2, 2, 32, "ghost", 1, 32),
    ("bn", 16, 4, 4, "real", 4, None),
    ("syncbn", 16, 2, 4, "one-process", 1, None),
    ("layernorm", 2, 2, 32, "one-process", 1, None),
    ("groupnorm", 8, 2, 8, "one-process", 1, None),
    ("none", 4, 2, 16, "one-process", 1, None),
])
def test_a_per_device_batch_becomes_real_ranks_ghost_slices_or_one_process(
        norm, per_device_batch, max_real_ranks, world_size, execution, nproc, ghost_slices):
    config = study_config(f"norm={norm}", f"study.per_device_batch={per_device_batch}", f"study.max_real_ranks={max_real_ranks}")
    layout = study_plan.plan(config)
    assert layout == study_plan.Layout(per_device_batch, world_size, execution)
    assert type(layout.world_size) is int
    arranged = layout.apply(config)
    assert (arranged.dist.nproc, arranged.norm.ghost_slices) == (nproc, ghost_slices)
    assert arranged.train == config.train and arranged.model == config.model


def test_an_ordinary_run_has_no_layout():
    assert study_plan.plan(study_config("study.per_device_batch=null")) is None


EQUAL_BATCHES = ("the batch-size study needs data.train_size divisible by train.global_batch_size=64, so that every "
                 "step splits into equal per-device batches; got {}")


@pytest.mark.parametrize("overrides,message", [
    (["study.per_device_batch=0"], "study.per_device_batch=0 must divide train.global_batch_size=64"),
    (["study.per_device_batch=24"], "study.per_device_batch=24 must divide train.global_batch_size=64"),
    (["study.max_real_ranks=0"], "study.max_real_ranks must be >= 1, got 0"),
    (["study.max_real_ranks=0", "study.per_device_batch=null"], "study.max_real_ranks must be >= 1, got 0"),
    (["dist.nproc=4"], "study.per_device_batch sets the world size itself: leave dist.nproc at 1 and start it without "
                       "torchrun"),
    (["norm=bn", "norm.ghost_slices=2"], "study.per_device_batch sets norm.ghost_slices itself: leave it null"),
    (["data.train_size=null"], EQUAL_BATCHES.format(None)),
    (["data.train_size=3900"], EQUAL_BATCHES.format(3900)),
    (["norm=bn", "study.per_device_batch=1"], "norm=bn with model=mlp normalizes over the per-device batch and needs 2 "
                                               "samples or more, got 1"),
])
def test_layouts_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as refusal:
        study_plan.plan(study_config(*overrides))
    assert str(refusal.value) == message


@pytest.mark.parametrize("overrides", [["study.max_real_ranks=1"], ["norm=bn", "study.per_device_batch=2"],
                                       ["norm=bn", "model=cnn", "study.per_device_batch=1"],
                                       ["norm=syncbn", "study.per_device_batch=1"], ["data.train_size=128"]])
def test_layouts_at_the_limits_are_planned(overrides):
    assert study_plan.plan(study_config(*overrides)) is not None


@pytest.mark.parametrize("norm,group_size,bn_span", [("groupnorm", None, None), ("bn", 1, 8), ("syncbn", 8, 64)])
def test_a_layout_is_saved_with_the_run_it_belongs_to(tmp_path, norm, group_size, bn_span):
    """With how many devices share each BatchNorm statistic, over how many samples."""
    config = study_config(f"norm={norm}", "seed=3", "train.epochs=7", "model=cnn")
    path = study_plan.Layout(8, 8, "one-process").save(config, tmp_path)
    assert path.read_text().endswith("\n") and json.loads(path.read_text()) == dict(
        norm=norm, model="cnn", seed=3, epochs=7, per_device_batch=8, world_size=8, execution="one-process",
        group_size=group_size, bn_span=bn_span)


def fused_config(*overrides: str) -> Config:
    return compose_config("+experiment=batch_size_study", *overrides)


def jobs_of(*overrides: str) -> list[study_plan.StudyJob]:
    """The fused study's jobs, each model's config composed with the same overrides, as the app does."""
    config = fused_config(*overrides)
    models = {model: fused_config(*overrides, f"model={model}") for model in study_plan.study_lists(config)[0]}
    return study_plan.fused_jobs(config, models)


def test_the_default_study_is_four_fused_jobs_whose_rows_are_each_model_norm_batch_and_seed_once():
    from syncbn.training.config import members

    jobs = jobs_of()
    assert [(job.name, job.world_size, job.config.dist.nproc, job.config.model.name) for job in jobs] == [
        ("mlp-w1", 1, 1, "mlp"), ("mlp-w2", 2, 2, "mlp"), ("cnn-w1", 1, 1, "cnn"), ("cnn-w2", 2, 2, "cnn")]
    rows = [row for job in jobs for row in job.rows]
    keys = [(r["model"], r["norm"], r["per_device_batch"], r["group_size"], r["seed"]) for r in rows]
    grouped = [r for r in rows if r["norm"] == "syncbn" and r["group_size"] != r["world_size"]]
    assert len(keys) == len(set(keys)) == 180 + len(grouped)
    # BN groups, MLP only: k = 2 ... 16 below W and dividing it, at every b: 4 at b = 2, 3, 2 and 1 at b = 16
    assert sorted({(r["per_device_batch"], r["group_size"]) for r in grouped}) == [
        (2, 2), (2, 4), (2, 8), (2, 16), (4, 2), (4, 4), (4, 8), (8, 2), (8, 4), (16, 2)]
    assert {r["model"] for r in grouped} == {"mlp"} and len(grouped) == 10 * 3
    assert all(r["bn_span"] == r["per_device_batch"] * r["group_size"] and r["execution"] == "ghost" and r["member"] ==
               dict(norm="syncbn", seed=r["seed"], bn_slice=r["per_device_batch"], bn_group=r["group_size"])
               for r in grouped)
    for job in jobs:
        assert job.config.study.per_device_batches is None and job.config.model.hidden == compose_config(
            f"model={job.config.model.name}").model.hidden
        names = [member.record() for member in members(job.config)]
        assert all({k: v for k, v in name.items() if k != "weight_scale"} in [r["member"] for r in job.rows] for name in names)
        assert all(r["member"] in [{k: v for k, v in n.items() if k != "weight_scale"} for n in names] for r in job.rows)
    w1 = jobs[0]
    assert w1.config.sweep.norms == ["syncbn", "layernorm", "groupnorm", "none", "bn"]
    assert w1.config.sweep.bn_slices == [16, 8, 4, 2] and w1.config.sweep.bn_groups == [2, 4, 8, 16]
    assert len(members(w1.config)) == 4 * 3 + 4 * 3 + 10 * 3, "no member the rows do not ask for"
    assert jobs[2].config.sweep.bn_groups is None
    assert jobs[1].config.sweep.norms == ["syncbn", "bn"] and jobs[1].config.sweep.bn_slices is None
    assert len(members(jobs[1].config)) == 2 * 3
    cnn = {(r["norm"], r["per_device_batch"]): (r["world_size"], r["execution"], r["member"])
           for r in jobs[2].rows + jobs[3].rows if r["seed"] == 1}
    spans = {(r["norm"], r["per_device_batch"]): (r["group_size"], r["bn_span"]) for r in jobs[2].rows + jobs[3].rows}
    assert spans[("syncbn", 2)] == (32, 64) and spans[("bn", 2)] == (1, 2) and spans[("bn", 32)] == (1, 32)
    assert spans[("syncbn", 32)] == (2, 64) and spans[("layernorm", 4)] == (None, None)
    assert cnn[("bn", 64)] == (1, "real", dict(norm="syncbn", seed=1)), "per-rank BN at W = 1 is syncbn at W = 1"
    assert cnn[("bn", 32)] == (2, "real", dict(norm="bn", seed=1)) and jobs[3].rows[3]["member"] == dict(norm="bn", seed=0)
    assert cnn[("bn", 16)] == (4, "ghost", dict(norm="bn", seed=1, bn_slice=16))
    assert cnn[("syncbn", 2)] == (32, "one-process", dict(norm="syncbn", seed=1))
    assert cnn[("syncbn", 32)] == (2, "real", dict(norm="syncbn", seed=1))
    assert cnn[("layernorm", 32)] == (2, "one-process", dict(norm="layernorm", seed=1)), "real ranks would repeat it"
    assert cnn[("none", 64)] == (1, "real", dict(norm="none", seed=1))


@pytest.mark.parametrize("overrides,jobs,slices", [
    (["study.max_real_ranks=4", "study.models=[mlp]"], ["mlp-w1", "mlp-w2", "mlp-w4"], [8, 4, 2]),
    (["study.per_device_batches=[32]", "study.models=[cnn]", "study.norms=[bn,syncbn]"], ["cnn-w2"], None),
    (["study.per_device_batches=[32]", "study.models=[cnn]"], ["cnn-w1", "cnn-w2"], None),
    (["study.per_device_batches=[32]", "study.models=[cnn]", "study.norms=[none,layernorm]"], ["cnn-w1"], None),
    (["study.per_device_batches=[64]", "study.models=[cnn]", "study.norms=[bn]"], ["cnn-w1"], [64]),
    (["study.per_device_batches=[64,8]", "study.models=[cnn]", "study.norms=[bn,syncbn]"], ["cnn-w1"], [8]),
    (["study.norms=[syncbn,none]", "study.models=[mlp]"], ["mlp-w1", "mlp-w2"], None),
    (["study.max_real_ranks=1", "study.models=[mlp]"], ["mlp-w1"], [32, 16, 8, 4, 2]),
    (["study.max_real_ranks=32", "study.models=[mlp]", "study.per_device_batches=[64,2]"], ["mlp-w1", "mlp-w32"], None),
])
def test_real_world_sizes_get_a_job_each_and_the_rest_is_emulated_in_the_w1_job(overrides, jobs, slices):
    planned = jobs_of(*overrides, "study.bn_groups=null")  # the slices of per-rank BN alone
    assert [job.name for job in planned] == jobs
    assert planned[0].config.sweep.bn_slices == slices


def test_a_study_job_is_saved_with_its_rows_and_epochs(tmp_path):
    job = jobs_of("study.models=[mlp]", "study.per_device_batches=[4]", "study.norms=[bn]", "study.seeds=[5]",
                  "train.epochs=3")[0]
    assert job.save(tmp_path) == tmp_path / study_plan.LAYOUT_FILE
    assert json.loads((tmp_path / study_plan.LAYOUT_FILE).read_text()) == dict(epochs=3, rows=[dict(
        model="mlp", epochs=3, norm="bn", per_device_batch=4, world_size=16, group_size=1, bn_span=4, seed=5,
        execution="ghost", member=dict(norm="bn", seed=5, bn_slice=4))])


@pytest.mark.parametrize("overrides,message", [
    (["study.per_device_batches=[]"], "study.per_device_batches must list at least one value, or be null, got []"),
    (["study.seeds=[0,0]"], "study.seeds lists a value twice: [0, 0]"),
    (["study.models=[mlp,vit]"], "study.models: each must be one of mlp, cnn, got 'vit'"),
    (["study.norms=[bn,rms]"], "study.norms: each must be one of syncbn, bn, none, layernorm, groupnorm, got 'rms'"),
    (["study.per_device_batches=[64,24]"], "study.per_device_batches=24 must divide train.global_batch_size=64"),
    (["study.per_device_batches=[0]"], "study.per_device_batches=0 must divide train.global_batch_size=64"),
    (["study.per_device_batch=32"], "study.per_device_batches (the fused study) and study.per_device_batch (one run of "
                                    "the per-run study): set one"),
    (["study.per_device_batches=null"], "study.models, norms and seeds are lists of the fused study: set "
                                        "study.per_device_batches too"),
    (["dist.nproc=2"], "study.per_device_batches sets the world size itself: leave dist.nproc at 1 and start it "
                       "without torchrun"),
    (["sweep.seeds=[1]"], "study.per_device_batches makes its jobs' members itself: leave sweep.* null"),
    (["norm=bn", "norm.ghost_slices=2"], "study.per_device_batches sets norm.ghost_slices itself: leave it null"),
    (["data.train_size=100"], EQUAL_BATCHES.format(100)),
    (["study.per_device_batches=[2,1]"], "norm=bn with model=mlp normalizes over the per-device batch and needs 2 "
                                         "samples or more, got 1"),
    (["study.bn_groups=[1,2]"], "study.bn_groups must all be >= 2 (a group of 1 is per-rank BN, norm bn), got [1, 2]"),
    (["study.bn_groups=[3,32]"], "study.bn_groups=[3, 32] makes no BN group: no world size of "
                                 "study.per_device_batches (1, 2, 4, 8, 16, 32 devices) is a larger multiple of any of them"),
    (["study.per_device_batches=[64,32]"], "study.bn_groups=[2, 4, 8, 16] makes no BN group: no world size of "
                                           "study.per_device_batches (1, 2 devices) is a larger multiple of any of them"),
    (["study.bn_groups=[2,2]"], "study.bn_groups must list distinct values, or be null, got [2, 2]"),
    (["study.bn_groups=[]"], "study.bn_groups must list distinct values, or be null, got []"),
    (["study.bn_group_models=[mlp,mpl]"], "study.bn_group_models: each must be one of mlp, cnn, got 'mpl'"),
    (["study.per_device_batches=null", "study.models=null", "study.norms=null", "study.seeds=null"],
     "study.bn_groups and study.bn_group_models make rows of the fused study: set study.per_device_batches too"),
])
def test_fused_studies_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as refusal:
        study_plan.check(fused_config(*overrides))
    assert str(refusal.value) == message


@pytest.mark.parametrize("overrides,grouped", [
    (["study.norms=[bn,none]"], 0), (["study.models=[cnn]"], 0), (["study.bn_group_models=null"], 60),
    (["study.bn_groups=[2]", "study.per_device_batches=[64,32,2]"], 3), (["study.bn_groups=null"], 0)])
def test_bn_groups_are_rows_of_the_studys_syncbn_in_the_models_named(overrides, grouped):
    """None without syncbn or in a model not named (no error: the experiment's defaults name them);
    a k is a row where it is below W and divides it (b = 32 is W = 2: no group of 2 below it)."""
    rows = [r for job in jobs_of(*overrides) for r in job.rows]
    assert len([r for r in rows if r["norm"] == "syncbn" and r["group_size"] != r["world_size"]]) == grouped


@pytest.mark.parametrize("overrides", [["study.per_device_batches=[64]", "study.norms=[bn]"],  # groups: none to make
                                       ["study.per_device_batches=[64]", "study.models=[cnn]"],
                                       ["study.per_device_batches=[2,1]", "study.models=[cnn]"],
                                       ["study.per_device_batches=[2,1]", "study.norms=[syncbn]"],
                                       ["study.models=null", "study.norms=null", "study.seeds=null"]])
def test_fused_studies_at_the_limits_are_planned(overrides):
    study_plan.check(fused_config(*overrides))
    assert jobs_of(*overrides)
