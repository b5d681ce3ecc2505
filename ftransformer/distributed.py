"""Data parallelism on ``torch.distributed``, for a model that is a pytree of tensors.

Launch with ``torchrun`` (``torchrun --standalone --nproc_per_node=N -m ftransformer train ...``):
every process holds the whole model, draws the same global batch (a pure function of ``(seed, step)``)
and keeps its own share of the rows (``DistContext.shard``). Inside the step, the token count and then
the gradients are summed across processes (``DistContext.all_reduce_sum``), so every process applies the
update a single process would compute from the whole batch, and the parameters stay identical
everywhere without ever being sent. Rank 0 alone writes logs, metrics, plots and checkpoints.

``torch.nn.parallel.DistributedDataParallel`` does the same for ``nn.Module``s by hooking their
parameters; a pure step has no module to hook, so the gradient pytree is reduced directly: its leaves
are packed into a few large flat buckets (one collective per bucket, not per tensor) and the buckets are
launched asynchronously, so packing the next bucket overlaps the reduction of the previous one.

A process that dies or stalls ends the others with ``DistributedError`` (the peers' sockets close at once;
a stall is caught by the process group's timeout) instead of a hang.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 120.0  # a collective that waits longer than this for a peer fails
BUCKET_BYTES = 25 * 2**20  # gradient bytes per all-reduce (DDP's default bucket size)
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed: another process died, stalled past the timeout, or the group is gone."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel group (see ``init_from_env``)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous share of the leading axis (its size must divide by world_size)."""
        n = rows.shape[0]
        if n % self.world_size:
            raise ValueError(f"a global batch of {n} rows does not split evenly over {self.world_size} processes")
        per = n // self.world_size
        return rows[self.rank * per:(self.rank + 1) * per]

    def all_reduce_sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """The elementwise sum of ``tensors`` over all processes (new tensors; the inputs are not changed)."""
        return all_reduce_sum(tensors, rank=self.rank)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        try:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()
        except RuntimeError as e:  # DistBackendError is one
            raise _lost(self.rank, "barrier", e) from e


def _lost(rank: int, what: str, error: Exception) -> DistributedError:
    return DistributedError(
        f"rank {rank}: the {what} across processes failed, so another process has died, stalled for longer "
        f"than the timeout, or left the group; the job stops here (the last checkpoint written by rank 0 "
        f"is intact; resume from it). Underlying error: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    )


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of one dtype and device, each up to ``bucket_bytes``
    (a single larger tensor gets a bucket of its own). Order is kept, so every rank builds the same buckets."""
    buckets, current, size, kind = [], [], 0, None
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        this = (t.dtype, t.device)
        if current and (this != kind or size + nbytes > bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        kind = this
    if current:
        buckets.append(current)
    return buckets


@torch.compiler.disable  # a compiled step calls this between two compiled graphs
def all_reduce_sum(tensors: list[Tensor], *, bucket_bytes: int = BUCKET_BYTES, rank: int | None = None) -> list[Tensor]:
    """Sum ``tensors`` over the default process group, packed into flat buckets reduced asynchronously.

    Each bucket's collective is launched as soon as it is packed, so packing the next bucket overlaps the
    communication of this one; all are awaited before the sums are unpacked. Returns new tensors shaped
    like the inputs. A failed collective raises ``DistributedError``.
    """
    rank = dist.get_rank() if rank is None else rank
    pending = []
    try:
        for idx in _buckets(tensors, bucket_bytes):
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])
            pending.append((idx, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
        out = list(tensors)
        for idx, flat, work in pending:
            work.wait()
            for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
                out[i] = piece.view(tensors[i].shape)
    except RuntimeError as e:  # DistBackendError is one
        raise _lost(rank, "gradient all-reduce", e) from e
    return out


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(*, timeout_s: float | None = None, device: str | torch.device | None = None) -> DistContext | None:
    """Join the process group torchrun describes in the environment; None when there is only one process.

    Backend: ``nccl`` when ``device`` (default: ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``)
    is a CUDA device, else ``gloo``. ``timeout_s`` (default ``FT_DIST_TIMEOUT`` or 120 s) bounds how long
    a collective waits for a peer.
    """
    if not launched():
        return None
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with torchrun "
            "(e.g. torchrun --standalone --nproc_per_node=2 -m ftransformer train ...)"
        )
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = float(os.environ.get("FT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout),
                                    device_id=device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank}: could not join the {world}-process group ({backend}): {e}") from e
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
