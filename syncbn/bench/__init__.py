"""Benchmarks, side by side in one run: SyncBatchNorm against local BatchNorm and the bare collectives.

    python -m syncbn.bench                 # full: world sizes 1, 2, 4 (docs/performance.md)
    python -m syncbn.bench --quick         # everyday check, about three minutes
    python -m syncbn.bench --plain-sweep   # only the sweep case's baseline: the plain loop
    python -m syncbn.bench --cases collective   # only some cases: here all-gather against all-reduce
    python -m syncbn.bench.projection      # ResNet-50's synchronization on NCCL, projected (no timing)
    python -m syncbn.bench --help          # every knob

Machines are shared and noisy, so absolute times move from run to run; ratios of contenders timed
in the same run hold when they are timed call by call, interleaved in an order shuffled every round,
and read as medians. Each figure is the median over ``calls`` calls of the slowest rank's time of the
call. A second copy of the floor (``floor_again``) is timed beside it: its ratio to the floor is the
run's own noise, the margin within which two contenders cannot be told apart.

Cases, each at every world size (ranks are local processes started by torch's elastic launcher):
1. layer: forward + backward of one norm layer, float32, per-rank shapes (25, 100), (100, 100),
   (8, 64, 32, 32) and the same in channels_last. Contenders: ``syncbn.SyncBatchNorm``; local
   ``nn.BatchNorm`` on the same input (the compute floor); both again under
   ``torch.compile(fullgraph=True)``; ``nn.SyncBatchNorm`` where CUDA is present; and the
   communication floor: the two bare all-gathers of the layer's packed payloads (also timed as
   all-reduces, the measurement behind choosing all-gather), and local BN, eager and compiled,
   with them in place; eager, also with each collective in flight during the BN work; and the least
   a synchronized BN can be on CPU (``syncbn/bench/minimum.py``).
2. step: one DDP training step of the trainer's MLP (5 norm layers), norm = syncbn / bn / none,
   eager and ``torch.compile``d (as ``train.compile=true``).
3. startup: what starting W ranks costs a job: launches of W ranks that join a process group and
   leave, in one process. The process's first launch also starts the launcher's forkserver (it is
   the first world size's first launch) and is reported apart.
4. sweep (``syncbn/bench/sweep.py``): whole commands, start-up included: the fused sweep at each
   world size and the per-run sweep at ``--per-run-world-sizes``, each followed by the plain
   single-process loop over the same networks and epochs (``--plain-sweep``).
5. study (``syncbn/bench/study.py``): the batch-size study's fused command against its per-run
   command on a reduced study (one seed, ``--study-epochs``), whole commands, the fused one run
   before and after the per-run one.
6. collective (``syncbn/bench/collectives.py``): a layer step with the all-gather and with the
   all-reduce at ``--collective-world-sizes`` (2, 4, 8) by ``--collective-channels`` (16 to 4096),
   the bytes each rank receives (counted by the kernel), what ``collective="auto"`` chose, and the
   cost model fitted to the run (``costfit``), whose constants ``syncbn.cost.GLOO`` ships.
Compile times are each compiled contender's first call, with a cold inductor cache.
Collectives per step are counted by the profiler (every ``c10d::`` op), not assumed.

The package: ``settings`` (what a run measures), ``timing`` (interleaved timing, the floors),
``cases`` (layer, step, startup), ``minimum`` (the least synchronized BN), ``sweep`` and
``study`` (whole commands), ``collectives`` and ``costfit`` (the collective case and its fit),
``projection`` (NCCL's model over ResNet-50), ``tables`` (the report), ``cli`` (this command).
"""
