"""The CUDA path, which no machine of this project has run: collected everywhere, skipped without
CUDA. ``launch/gpu_check.sh`` runs it on whatever GPUs a machine has (and reports):

- on NCCL (a GPU per rank, 2 or more GPUs): the layer, with either collective, against
  ``torch.nn.SyncBatchNorm``, forward, backward and running statistics, float32 and float64, uneven
  batches, channels-last, fp16/bf16 inputs as autocast hands them;
- on one GPU shared by 2 ranks over Gloo (NCCL refuses two ranks on one device): the layer against
  ``nn.BatchNorm`` on the concatenated batch, which shows Gloo's CUDA collectives cover the layer's;
- a short DDP training run on CUDA in float64 against the same run on CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
from app import read_metrics, run, strip
from gloo import GlooGroup
from test_batchnorm import SHAPES, Case, assert_matches_reference, reference

from syncbn import SyncBatchNorm

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(GPUS == 0, reason="no CUDA device here: launch/gpu_check.sh "
                                                                  "runs these on a machine with GPUs")]
needs_two_gpus = pytest.mark.skipif(0 < GPUS < 2, reason=f"NCCL takes a GPU per rank; {GPUS} here (one GPU: the "
                                                     "shared-GPU Gloo tests)")
# float32 on two kernels that sum in different orders agree to float32's rounding; half precision to its own.
TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
             torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
CASES = [(dtype, shape) for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
         for shape in ("NC", "NCHW", "NCHW-channels_last")]


@pytest.fixture(scope="module")
def nccl_group():
    group = GlooGroup(2, backend="nccl")
    yield group
    group.close()


@pytest.fixture(scope="module")
def shared_gpu_group():
    group = GlooGroup(2)
    yield group
    group.close()


def both_layers_on_rank(case: Case) -> dict:
    """Ours and torch's on this rank's GPU, the same inputs, float32 parameters (as autocast keeps
    them) and a float32 output gradient; results back on the CPU."""
    rank, device = dist.get_rank(), torch.device("cuda", torch.cuda.current_device())
    results = {}
    for name, cls in (("ours", SyncBatchNorm), ("torch", torch.nn.SyncBatchNorm)):
        ours = {"collective": case.collective} if cls is SyncBatchNorm else {}
        layer = case.make(cls, **ours).to(device, torch.float32 if case.dtype in (torch.float16, torch.bfloat16) else case.dtype)
        outputs, grads = [], []
        for x_global, dy_global in case.global_batches():
            x = case.local(x_global, rank).to(device).requires_grad_()
            y = layer(x)
            y.backward(case.local(dy_global, rank).to(device, y.dtype))
            outputs.append(y.detach().cpu())
            grads.append(x.grad.cpu())
        results[name] = dict(outputs=outputs, grads=grads, running_mean=layer.running_mean.cpu(),
                             running_var=layer.running_var.cpu(), weight_grad=layer.weight.grad.cpu(),
                             kept_format=y.is_contiguous(memory_format=case.memory_format))
    return results


@needs_two_gpus
@pytest.mark.parametrize("collective", ["all_gather", "all_reduce"])
@pytest.mark.parametrize("dtype,shape", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_the_layer_matches_torchs_syncbatchnorm_on_nccl(nccl_group, dtype, shape, collective):
    sample_shape, memory_format = SHAPES[shape]
    case = Case(sample_shape, memory_format, (3, 5), dtype=dtype, collective=collective)
    for rank, result in enumerate(nccl_group.run(both_layers_on_rank, case)):
        ours, theirs = result["ours"], result["torch"]
        assert ours["kept_format"], f"rank {rank} lost the {memory_format}"
        for step in range(len(ours["outputs"])):
            torch.testing.assert_close(ours["outputs"][step], theirs["outputs"][step], **TOLERANCE[dtype])
            torch.testing.assert_close(ours["grads"][step], theirs["grads"][step], **TOLERANCE[dtype])
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(ours[name], theirs[name], **TOLERANCE[torch.float32 if dtype != torch.float64 else dtype])


def layer_on_shared_gpu(case: Case) -> dict:
    """The parity harness's rank function, on cuda:0 for every rank."""
    rank, device = dist.get_rank(), torch.device("cuda", 0)
    layer = case.make(SyncBatchNorm).to(device)
    outputs, input_grads = [], []
    for x_global, dy_global in case.global_batches():
        x = case.local(x_global, rank).to(device).requires_grad_()
        y = layer(x)
        y.backward(case.local(dy_global, rank).to(device))
        outputs.append(y.detach().cpu())
        input_grads.append(x.grad.cpu())
    layer.eval()
    with torch.no_grad():
        eval_out = layer(case.local(case.eval_batch(), rank, sizes=(3,) * len(case.sizes)).to(device)).cpu()
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return dict(outputs=outputs, input_grads=input_grads, formats_kept=[True], eval_out=eval_out,
                weight_grad=cpu(layer.weight.grad), bias_grad=cpu(layer.bias.grad), running_mean=cpu(layer.running_mean),
                running_var=cpu(layer.running_var), num_batches_tracked=cpu(layer.num_batches_tracked))


@pytest.mark.parametrize("shape", ["NC", "NCHW", "NCHW-channels_last"])
def test_two_ranks_sharing_one_gpu_over_gloo_give_batchnorm_on_the_global_batch(shared_gpu_group, shape):
    sample_shape, memory_format = SHAPES[shape]
    case = Case(sample_shape, memory_format, (3, 5))
    assert_matches_reference(case, shared_gpu_group.run(layer_on_shared_gpu, case), reference(case))


def test_ddp_training_on_cuda_gives_the_cpu_runs_metrics_in_float64(tmp_path):
    """Two ranks (NCCL with 2 GPUs, else Gloo on one), float64: accuracies equal, losses to 1e-9."""
    where = ["dist.device=cuda"] if GPUS >= 2 else ["dist.device=cuda:0", "dist.backend=gloo"]
    common = [sys.executable, "-m", "syncbn.train", "dist.nproc=2", "train.dtype=float64", "train.epochs=3"]
    run([*common, *where, f"hydra.run.dir={tmp_path / 'cuda'}"])
    run([*common, "dist.device=cpu", f"hydra.run.dir={tmp_path / 'cpu'}"])
    for on_gpu, on_cpu in zip(strip(read_metrics(tmp_path / "cuda")), strip(read_metrics(tmp_path / "cpu")), strict=True):
        assert on_gpu["train_loss"] == pytest.approx(on_cpu["train_loss"], rel=1e-9)
        assert {k: v for k, v in on_gpu.items() if k != "train_loss"} == {k: v for k, v in on_cpu.items() if k != "train_loss"}
