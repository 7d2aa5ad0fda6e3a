"""Process groups and process launch for tensor parallelism (torch.distributed; nothing home-made).

One process per rank. Rank 0 owns the scheduler, the tokenizer and the server; the other ranks run
`spillover.distributed.worker`, receive each step's inputs from rank 0 (a broadcast on a gloo "control"
group) and run the same step; the layers' all-reduces and the head's all-gather run on the data group
(NCCL on GPUs, gloo on the CPU).

- One machine: `start()` spawns ranks 1..N-1 as child processes (`python -m spillover.distributed.worker`)
  and joins them as rank 0; a watchdog ends the run with a clear message if one of them dies.
- Several machines: `torchrun` starts every process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set;
  rank 0 runs the command (`spillover serve ...`), every other rank turns into a worker inside `start()`.

Backend: NCCL when CUDA is available, else gloo; `SPILLOVER_TP_BACKEND=gloo` forces gloo (tests on CPUs).
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from spillover.distributed.shard import Collectives
from spillover.errors import DistributedError

log = logging.getLogger(__name__)

ENV_BACKEND = "SPILLOVER_TP_BACKEND"
CONTROL_TIMEOUT = datetime.timedelta(days=30)  # workers wait on the control group while a server idles
DATA_TIMEOUT = datetime.timedelta(minutes=10)


def choose_backend(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    forced = env.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in ("gloo", "nccl"):
            raise DistributedError(f"{ENV_BACKEND} must be gloo or nccl, got {forced!r}")
        return forced
    return "nccl" if torch.cuda.is_available() else "gloo"


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env and "MASTER_ADDR" in env


@dataclass
class TPContext:
    rank: int
    world: int
    backend: str
    device: str  # this rank's device: "cuda:LOCAL_RANK" with NCCL, "cpu" with gloo
    comm: Collectives
    control: Any  # gloo group for the step broadcasts
    workers: list[subprocess.Popen] = field(default_factory=list)  # rank 0 on one machine: its children
    closed: bool = False
    failure: str | None = None  # set by the watchdog when a rank died

    def send(self, msg: Any) -> None:
        """Rank 0: broadcast `msg` (any picklable object) to every rank."""
        import torch.distributed as dist

        self.check()
        try:
            dist.broadcast_object_list([msg], src=0, group=self.control)
        except Exception as e:  # a peer went away in the middle of the broadcast: say which, if it died
            failure = self.dead_worker() if self.rank == 0 else self.failure
            raise DistributedError(failure or f"tensor-parallel broadcast failed: {e}") from None

    def recv(self) -> Any:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def dead_worker(self, wait: float = 3.0) -> str | None:
        """Rank 0 on one machine, after a failed collective: the failure if a worker died (waiting up to
        `wait` seconds for its exit to show), else None."""
        deadline = time.monotonic() + wait
        while self.failure is None and self.workers:
            for r, p in enumerate(self.workers, start=1):
                code = p.poll()
                if code is not None:
                    self.failure = (
                        f"tensor-parallel rank {r} died (exit code {code}); the run cannot continue"
                    )
            if self.failure or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return self.failure

    def check(self) -> None:
        if self.failure:
            raise DistributedError(self.failure)

    def close(self) -> None:
        """Rank 0: tell the workers to stop, wait for them, leave the group."""
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist

        if self.rank == 0 and not self.failure:
            try:
                dist.broadcast_object_list([None], src=0, group=self.control)
            except Exception:  # noqa: BLE001 - a dead peer: the processes are ended below
                pass
        for p in self.workers:
            try:
                p.wait(timeout=30 if not self.failure else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _leave(code: int) -> None:
    """A worker rank is done: leave the group, then end the process without running interpreter teardown
    (a gloo pair thread still joinable at teardown aborts the process: "terminate called without an active
    exception", seen in about 1 run of 6 under torchrun)."""
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - rank 0 may be gone already
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, local_rank: int, init_method: str) -> TPContext:
    import torch.distributed as dist

    backend = choose_backend()
    device = "cpu"
    kw: dict[str, Any] = {}
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank} needs GPU {local_rank} but this machine has {torch.cuda.device_count()}"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        kw["device_id"] = torch.device(device)
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=DATA_TIMEOUT, **kw
    )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPContext(rank, world, backend, device, Collectives(None), control)


def start(world: int) -> TPContext:
    """Join (under torchrun) or create (one machine) a group of `world` ranks; returns rank 0's context.

    Under torchrun a process whose RANK is not 0 serves as a worker here and exits when rank 0 stops."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise DistributedError(
            "a tensor-parallel engine is already running in this process (torch.distributed has one default "
            "group per process); close() it first"
        )
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world:
            raise DistributedError(
                f"torchrun started {env_world} processes but the tensor-parallel size is {world}"
            )
        rank = int(os.environ["RANK"])
        ctx = _init(rank, world, int(os.environ.get("LOCAL_RANK", rank)), "env://")
        if rank != 0:
            from spillover.distributed.worker import serve

            serve(ctx)
            _leave(0)
        atexit.register(ctx.close)
        return ctx
    port = _free_port()
    init = f"tcp://127.0.0.1:{port}"
    workers = []
    for r in range(1, world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "SPILLOVER_TP_INIT": init, "SPILLOVER_TP_PARENT": str(os.getpid())}  # fmt: skip
        workers.append(subprocess.Popen([sys.executable, "-m", "spillover.distributed.worker"], env=env))
    try:
        ctx = _init(0, world, 0, init)
    except Exception as e:
        for p in workers:
            p.kill()
        raise DistributedError(f"cannot start {world} tensor-parallel ranks: {e}") from None
    ctx.workers = workers
    atexit.register(ctx.close)
    threading.Thread(target=_watchdog, args=(ctx,), daemon=True, name="spillover-tp-watchdog").start()
    return ctx


def _watchdog(ctx: TPContext, grace: float = 5.0) -> None:
    """Rank 0: if a worker dies, record why, stop the others and, if the main thread stays blocked in a
    collective (NCCL does not notice a dead peer), end the process with the message."""
    while not ctx.closed:
        for r, p in enumerate(ctx.workers, start=1):
            code = p.poll()
            if code is not None and not ctx.closed:
                ctx.failure = f"tensor-parallel rank {r} died (exit code {code}); the run cannot continue"
                log.error(ctx.failure)
                for q in ctx.workers:
                    if q.poll() is None:
                        q.kill()
                time.sleep(grace)
                if not ctx.closed:
                    print(f"error: {ctx.failure}", file=sys.stderr, flush=True)
                    os._exit(1)
                return
        time.sleep(0.2)
