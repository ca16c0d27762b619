"""What a benchmark run measures: its cases' sizes and repeats (``--quick`` or each knob)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from syncbn.training.config import MODELS, NORMS


LAYER_SHAPES = {
    "(25,100)": ((25, 100), torch.contiguous_format),
    "(100,100)": ((100, 100), torch.contiguous_format),
    "(8,64,32,32)": ((8, 64, 32, 32), torch.contiguous_format),
    "(8,64,32,32) channels_last": ((8, 64, 32, 32), torch.channels_last),
}
STEP_NORMS = ("syncbn", "bn", "none")
CASES = ("startup", "layer", "step", "sweep", "study", "collective")
STUDY_GLOBAL_BATCH = 64  # conf/experiment/batch_size_study.yaml's train.global_batch_size


@dataclass
class Settings:
    world_sizes: list[int] = field(default_factory=lambda: [1, 2, 4])
    shapes: list[str] = field(default_factory=lambda: list(LAYER_SHAPES))
    warmup: int = 10
    calls: int = 420
    compile: bool = True
    step_norms: list[str] = field(default_factory=lambda: list(STEP_NORMS))
    startup_launches: int = 6
    sweep_scales: int = 16
    sweep_epochs: int = 20
    sweep_repeats: int = 3
    per_run_world_sizes: list[int] = field(default_factory=lambda: [2])
    study_models: list[str] = field(default_factory=lambda: list(MODELS))  # none: no study case
    study_norms: list[str] = field(default_factory=lambda: list(NORMS))
    study_batches: list[int] = field(default_factory=lambda: [64, 32, 16, 8, 4, 2])
    study_epochs: int = 2
    collective_world_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    collective_channels: list[int] = field(default_factory=lambda: [16, 64, 256, 1024, 4096])
    cases: list[str] = field(default_factory=lambda: list(CASES))
    device: str = "cpu"

    @classmethod
    def quick(cls) -> Settings:
        return cls(world_sizes=[1, 2], shapes=["(25,100)", "(8,64,32,32)"], warmup=3, calls=25,
                   step_norms=["syncbn", "bn"], startup_launches=2, sweep_scales=1, sweep_epochs=1,
                   sweep_repeats=1, study_models=["mlp"], study_norms=["syncbn", "bn"], study_batches=[64, 32, 4],
                   study_epochs=1, collective_world_sizes=[2], collective_channels=[16, 4096])
