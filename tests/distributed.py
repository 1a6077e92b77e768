"""Run a function on N gloo ranks (CPU tensor parallelism) and collect rank 0's result."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world: int, tp: int, fn, args, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron.sparse import parallel

    try:
        parallel.initialize(tp, init_method=f"file://{out_path}.rendezvous")
        result = fn(*args)
        if rank == 0:
            torch.save(result, out_path)
    except Exception:  # surfaced to the parent through the error file
        with open(f"{out_path}.err{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        parallel.shutdown()


def run_distributed(fn, world_size: int, *args, tp: int | None = None):
    """Call ``fn(*args)`` on ``world_size`` processes (TP = ``tp`` or the world size).

    ``fn`` must be a module-level function; rank 0's return value (tensors, dicts, lists, numbers)
    comes back here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        try:
            mp.start_processes(_worker, args=(world_size, tp or world_size, fn, args, out),
                               nprocs=world_size, join=True,
                               start_method="spawn")
        except Exception as exc:
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp))
                      if ".err" in f]
            raise RuntimeError(f"distributed worker failed: {exc}\n" + "\n".join(errors)) from exc
        return torch.load(out, weights_only=True)
