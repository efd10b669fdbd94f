"""Multi-process training under torchrun: process group setup and model wrapping (FSDP2 or DDP).

`torchrun --nproc-per-node N -m opengpt train RECIPE` sets RANK / WORLD_SIZE / LOCAL_RANK; we then
join a process group (nccl on GPU, gloo on CPU) and shard the model with PyTorch's FSDP2
(`fully_shard`, ZeRO-3 style: parameters, gradients and optimizer state split across ranks, each
block gathered just in time), or replicate it with DDP (`parallel: ddp` in the recipe). Without
torchrun everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; one process otherwise."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def wrap_model(model: nn.Module, info: DistInfo, parallel: str, param_dtype: torch.dtype | None = None,
               device: str = "cpu") -> nn.Module:
    """FSDP2: one FSDP unit per block plus the root (embeddings, norm, head); DDP: plain replication."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.local_rank] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
