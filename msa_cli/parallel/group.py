"""The ranks of a sharded run, as torchrun starts them: one torch.distributed process group and the few
collectives a sharded bank needs, each turning a rank that died or went silent into one clear error, never a hang.

gloo on a CPU, NCCL with --device cuda, chosen from the device. Rank 0's commands to the others (parallel/
serve.py) always go over a gloo group of their own with no practical timeout: between two questions the others
wait as long as the user does. Every other collective gives up after settings.parallel_timeout() seconds. Objects
travel pickled (torch.distributed's object collectives): every peer is a rank of the same job, started by the same
launcher. `moved` counts the payload bytes between rank 0 and the others, which benchmarks/memory_parallel.py
reports per question.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import errors, settings


class RankFailed(errors.MsaError):
    code = errors.RANK_FAILED


def launched() -> bool:
    """Whether torchrun (or a launcher like it) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Group:
    def __init__(self, device: str):
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        cuda = device.startswith("cuda")
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        self.timeout = settings.parallel_timeout()
        self.moved = 0
        self.failed = False
        try:
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=self.timeout))
            self.commands = dist.new_group(backend="gloo", timeout=timedelta(days=30))
        except Exception as e:
            raise RankFailed(f"rank {self.rank} of {self.world} cannot join the others: {_first_line(e)}") from None
        # torchrun stops every rank with SIGTERM as soon as one fails, often before the survivors' collectives
        # have failed: rank 0 still says why, in one line. (A server's model thread leaves signals to uvicorn.)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._stopped)

    def command(self, message: object = None) -> object:
        """Rank 0 sends `message` to every rank; the others wait for it and get it."""
        box = [message]
        self._run("waiting for rank 0's next command", dist.broadcast_object_list, box, src=0,
                  group=self.commands)
        if self.rank == 0:
            self.moved += _size(message) * (self.world - 1)
        return box[0]

    def gather(self, obj: object) -> list | None:
        """Every rank's `obj`, on rank 0 (None elsewhere), in rank order."""
        out = [None] * self.world if self.rank == 0 else None
        self._run("gathering from every rank", dist.gather_object, obj, out, dst=0)
        if out is not None:
            self.moved += sum(_size(o) for o in out[1:])
        return out

    def all_gather(self, obj: object) -> list:
        out = [None] * self.world
        self._run("exchanging with every rank", dist.all_gather_object, out, obj)
        self.moved += _size(obj) * 2 * (self.world - 1)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64), every rank getting the sums."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._run("summing over every rank", dist.all_reduce, t)
        self.moved += t.numel() * 8 * 2 * (self.world - 1)   # each other rank's values in, the sums back out
        return t.tolist()

    def close(self) -> None:
        """Leave the group; left unclosed, gloo's threads can abort the process as it exits (SIGABRT)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def _stopped(self, signum, frame) -> None:
        if self.failed:   # this rank is already saying why
            return
        self.failed = True
        raise RankFailed(f"rank {self.rank} of {self.world}: stopped by a signal (torchrun stops every rank when one "
                         f"fails: its own error, if it had one, is above)")

    def _run(self, what: str, collective, *args, **kw) -> None:
        try:
            collective(*args, **kw)
        except Exception as e:   # gloo and NCCL raise RuntimeError or DistBackendError, never an MsaError
            self.failed = True
            text = _first_line(e)
            why = (f"a rank did not answer within {self.timeout:g} s (MSA_PARALLEL_TIMEOUT)" if "imed out" in text
                   else "a rank stopped (its own error, if it had one, is above)")
            raise RankFailed(f"rank {self.rank} of {self.world}, {what}: {why} [{text}]") from None


def _size(obj: object) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
