"""What every Ray Train worker loop of the jobs starts with."""

from __future__ import annotations


def worker_setup(cpu_threads: float):
    """(rank, world size, device, on_gpu) of this Ray Train worker; on CPU, torch uses
    ``cpu_threads`` intra-op threads (at least one)."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(cpu_threads)))
    return ctx.get_world_rank(), ctx.get_world_size(), device, on_gpu
