"""Where a fused job's training step and evaluation spend their time (docs/performance.md):

    python tests/profile_fused.py cnn      # the batch-size study's cnn-w1 job: 24 members
    python tests/profile_fused.py mlp

The model is the W = 1 job's of ``+experiment=batch_size_study``; the step is SGD on a random batch
of 64 (2 threads); the profile is torch.profiler's table of the busiest operators.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from app import compose_config  # noqa: E402

from syncbn.experiments import study_plan  # noqa: E402
from syncbn.training.members import build_network  # noqa: E402

def w1_job(model: str):
    """The config of ``+experiment=batch_size_study``'s W = 1 job of ``model``."""
    study = ("+experiment=batch_size_study", f"study.models=[{model}]")
    return study_plan.fused_jobs(compose_config(*study), {model: compose_config(*study, f"model={model}")})[0].config


def main(model: str) -> None:
    torch.set_num_threads(2)
    network = build_network(w1_job(model))
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        logits = network(images)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.size(0)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(20):
        step()
    print(f"{model}, {len(network.members)} members: {(time.perf_counter() - start) / 20 * 1000:.0f} ms per step")
    network.eval()
    test = torch.rand(1000, 1, 28, 28)
    for batch in (1000, 50):
        with torch.no_grad():
            start = time.perf_counter()
            for first in range(0, len(test), batch):
                network(test[first : first + batch])
        print(f"eval of 1000 images in batches of {batch}: {time.perf_counter() - start:.2f} s")
    network.train()
    with torch.profiler.profile() as profile:
        for _ in range(5):
            step()
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cnn")
