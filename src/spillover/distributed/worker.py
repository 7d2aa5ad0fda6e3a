"""A tensor-parallel rank other than 0: build this rank's shard, then run every step rank 0 broadcasts.

Started by `group.start()` (one machine: `python -m spillover.distributed.worker`) or by torchrun (any
process whose RANK is not 0). Messages from rank 0, in order: the model spec (dict), ("runner", settings),
then ("step", StepInputs) / ("capture", (batch, len)) until None (stop).
"""

from __future__ import annotations

import os
import sys
import threading
import time

from spillover.distributed.group import TPContext, _leave


def serve(ctx: TPContext) -> None:
    from spillover.distributed.runner import build_rank

    spec = ctx.recv()
    if spec is None:
        return
    runner = build_rank(ctx, spec)
    msg = ctx.recv()
    if msg is None:
        return
    _, settings = msg
    runner = runner(**settings)
    while True:
        msg = ctx.recv()
        if msg is None:
            return
        kind, payload = msg
        if kind == "step":
            runner.run_remote(payload)
        elif kind == "capture":
            runner.capture_graphs(*payload)


def _exit_with_parent(parent: int) -> None:
    """One machine: a worker ends when rank 0's process is gone (it cannot be told any more)."""
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(0.5)


def main() -> None:
    from spillover.distributed.group import _init

    parent = os.environ.get("SPILLOVER_TP_PARENT")
    if parent:
        threading.Thread(target=_exit_with_parent, args=(int(parent),), daemon=True).start()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    init = os.environ.get("SPILLOVER_TP_INIT", "env://")
    ctx = _init(rank, world, int(os.environ.get("LOCAL_RANK", rank)), init)
    try:
        serve(ctx)
    except Exception as e:  # noqa: BLE001 - rank 0 reports the death; say why here
        print(f"spillover tensor-parallel rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    _leave(0)


if __name__ == "__main__":
    main()
