"""Train the MNIST MLP with DDP and synchronized BatchNorm (Hydra app).

    python -m syncbn.train                                    # one process, world size 1
    python -m syncbn.train norm=bn model.weight_scale=0.05    # any key of conf/ can be overridden
    python -m syncbn.train dist.nproc=4                       # CPU simulation: 4 Gloo ranks here
    launch/torchrun.sh --nproc-per-node=4 norm=syncbn         # torchrun: NCCL on GPUs, else Gloo
    torchrun --standalone --nproc-per-node=2 -m syncbn.train hydra.run.dir=outputs/run1
    python -m syncbn.train -m +experiment=weight_scale_sweep dist.nproc=2

Under torchrun every rank runs this app: pass one ``hydra.run.dir`` to all of them (the launch/
scripts do); ranks other than 0 write nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from syncbn import distributed, trainer
from syncbn.config import Config, register, to_config, validate

log = logging.getLogger("syncbn.train")
register()


def run_rank(config: Config, run_dir: Path) -> list[dict]:
    """One rank of the run, inside its process group."""
    with distributed.process_group(config.dist) as ctx:
        return trainer.fit(config, ctx, run_dir)


def run_simulated_rank(config: Config, run_dir: Path) -> list[dict]:
    """A rank started by ``launch_local``: a fresh process, so set up its logging first."""
    if int(os.environ["RANK"]) == 0:
        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
            handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / "train.log")],
        )
    distributed.share_cpu_threads()
    return run_rank(config, run_dir)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config = to_config(cfg)
    world_size = distributed.planned_world_size(config.dist)
    validate(config, world_size)
    distributed.check(config.dist)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if config.dist.nproc > 1 and not distributed.launched():
        log.info("CPU simulation: %d ranks through the elastic launcher, output in %s", world_size, run_dir)
        distributed.launch_local(run_simulated_rank, (config, run_dir), world_size)
    else:
        run_rank(config, run_dir)


def cli() -> None:
    if int(os.environ.get("RANK", 0)) > 0:
        # torchrun starts every rank with the same command line: only rank 0 writes Hydra's files.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()


if __name__ == "__main__":
    cli()
