"""Tensor parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs): `shard.py` (the transform and which
slices a rank holds), `slices.py` + `load.py` (each rank reads only its slices), `group.py` (process groups,
launch, watchdog), `worker.py` (ranks other than 0), `runner.py` (the lockstep ModelRunner). The decision
to use it is planned in `placement/tensor_parallel.py`."""
