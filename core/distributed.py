"""One pre-training on several devices: N processes, each on a slice of every batch.

``pretrain(config)`` with ``config.devices = N > 1`` calls :func:`launch`, which spawns N
processes (``torch.multiprocessing``, start method ``spawn``) that join one process group
(``nccl`` on CUDA, one GPU each, ``cuda:0`` .. ``cuda:N-1``; ``gloo`` on the CPU) and run
``core.train.train_process`` as ranks 0..N-1. The optimization is the one of a single process,
to float rounding:

- every rank draws the same batch order, augmentation and PGD random starts from the run's
  seeded generator, for the whole global batch, and keeps its contiguous slice of the rows
  (:meth:`Shard.rows`), so the global batch is the single-process batch;
- batch norm normalizes with the statistics of the global batch (:class:`GlobalBatchNorm2d`,
  whose backward is that of the global batch too), so the forward matches;
- each rank's mean loss is weighted by its share of the global batch and
  ``DistributedDataParallel`` averages the gradients (model and PCL centroids alike), so the
  gradient is the global batch's mean even when the slices differ in size (or one is empty);
- the optimizers, the lr schedule and the PGD steps then compute the same thing on every rank.

Rank 0 reports progress (relayed to the caller's callback in the launching process), writes
the per-epoch training state and the checkpoint; every rank resumes from that state.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue as queue_module
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import start_processes

from core.progress import Progress, ProgressCallback, ignore_progress

if TYPE_CHECKING:
    from core.config import PretrainConfig
    from core.data import ImageDataset
    from core.train import PretrainResult

# How long a rank waits for the others in one collective before it fails; a rank that died
# is noticed sooner, by the launcher, which then stops the others.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
POLL_SECONDS = 0.1  # how often the launcher checks on the ranks while no progress comes


@dataclass(frozen=True)
class Shard:
    """This process's part of a distributed run: its rank among ``world_size`` and device."""

    rank: int
    world_size: int
    device: torch.device

    def rows(self, batch: int) -> slice:
        """This rank's contiguous rows of a global batch of ``batch`` rows.

        The first ``batch % world_size`` ranks take one row more, as ``torch.tensor_split``
        does; a rank's slice is empty when the batch has fewer rows than ranks.
        """
        base, extra = divmod(batch, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: every rank's output is the sum, so the gradient of
    the ranks' summed losses with respect to one rank's input is the sum of the output
    gradients (all_reduce again)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, differentiable."""
    result: torch.Tensor = _SumAcrossRanks.apply(tensor)
    return result


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, while training in a process group, normalizes with the statistics
    of the global batch (every rank's rows) and updates its running statistics with them.

    torch's ``SyncBatchNorm`` does the same on GPUs only; this one works with gloo on the
    CPU too, and being a ``BatchNorm2d`` it keeps the state dict's names and the models'
    batch-norm folding (``core.models.FoldedBatchNorm``). The mean and variance are computed
    in two passes (mean first, then squared deviations), in float32, like the single-process
    kernels, so that the result matches a single process to float rounding. Outside a process
    group, or in eval mode, it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        values = x.float()
        dims = (0, 2, 3)
        local_count = values.new_tensor([values.numel() / values.shape[1]])
        totals = sum_across_ranks(torch.cat([values.sum(dims), local_count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centered = values - mean[None, :, None, None]
        var = sum_across_ranks(centered.square().sum(dims)) / count
        out = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor
    ) -> None:
        # As nn.BatchNorm2d does: the running variance is the unbiased one. The count stays a
        # tensor: reading it on the host would wait for the GPU in every layer.
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1.0).clamp_min(1.0))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` under ``module`` by a :class:`GlobalBatchNorm2d`
    holding the same parameters and buffers (in place; returns ``module``)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            # The very tensors, so optimizers and hooks made earlier still see them.
            replacement.weight, replacement.bias = child.weight, child.bias
            replacement.running_mean = child.running_mean
            replacement.running_var = child.running_var
            replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batch_norm(child)
    return module


def _free_port() -> int:
    # Rank 0 listens there for the others; another process could take it between this call
    # and rank 0's bind, which then fails the run with "address already in use" (retry it).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def plan(config: PretrainConfig) -> tuple[str, list[torch.device]]:
    """The backend and the device of every rank, or a ``TrainingError`` saying what is missing."""
    from core.device import resolve_device
    from core.train import TrainingError

    device = resolve_device(config.device)
    if device.type == "cpu":
        return "gloo", [device] * config.devices
    if device.type != "cuda":
        raise TrainingError(f"devices > 1 runs on CUDA GPUs or the CPU, not on {device.type}")
    if device.index is not None:
        raise TrainingError(
            f"device {config.device!r} names one GPU, but devices={config.devices} uses GPUs "
            f"0..{config.devices - 1}: give device 'cuda' (choose the GPUs with "
            "CUDA_VISIBLE_DEVICES)"
        )
    available = torch.cuda.device_count()
    if config.devices > available:
        raise TrainingError(
            f"devices={config.devices} asks for {config.devices} GPUs, but this machine has "
            f"{available}: lower devices or run on a machine with more GPUs"
        )
    return "nccl", [torch.device("cuda", index) for index in range(config.devices)]


@contextmanager
def _may_start_children() -> Iterator[None]:
    """Let a daemonic process (a Celery prefork pool child, where the worker runs jobs) start
    the ranks. multiprocessing refuses because a daemon's children outlive it when it is
    killed; the ranks die with their launcher instead (``_die_with_parent``), and the
    launcher stops them on any exit of its own."""
    process = multiprocessing.current_process()
    config: dict[str, Any] = process._config  # type: ignore[attr-defined]
    saved = dict(config)
    config["daemon"] = False
    # Celery's billiard leaves its own authkey type here, which spawn refuses to pickle.
    config["authkey"] = multiprocessing.process.AuthenticationString(  # type: ignore[attr-defined]
        bytes(process.authkey)
    )
    try:
        yield
    finally:
        config.clear()
        config.update(saved)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent (the launcher) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own clean-up must do
        pass


def launch(
    config: PretrainConfig,
    *,
    out_dir: Path,
    work_dir: Path,
    progress: ProgressCallback = ignore_progress,
    dataset: ImageDataset | None = None,
) -> PretrainResult:
    """Run ``config`` as ``config.devices`` processes and return rank 0's result.

    Blocks until every rank finished. Rank 0's progress reaches ``progress`` here; an
    exception from ``progress`` (or a signal's) stops every rank, and a new call resumes from
    the last finished epoch. A ``BulwarkError`` raised in a rank is raised here as it was.
    On the CPU each rank gets this process's torch threads divided by the ranks (at least 1).
    """
    from dataclasses import replace

    from core.errors import BulwarkError
    from core.train import TrainingError

    started = time.perf_counter()
    backend, devices = plan(config)
    threads = max(1, torch.get_num_threads() // config.devices)
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()  # ranks -> launcher: progress, result, error
    acks = context.Queue()  # launcher -> rank 0: progress handled, go on
    address = f"tcp://127.0.0.1:{_free_port()}"
    with _may_start_children():
        processes = start_processes(
            _rank_main,
            args=(
                config,
                out_dir,
                work_dir,
                dataset,
                devices,
                backend,
                address,
                threads,
                messages,
                acks,
            ),
            nprocs=config.devices,
            join=False,
            start_method="spawn",
        )
    outcome: dict[str, Any] = {}

    def handle(kind: str, payload: Any, *, reply: bool = True) -> None:
        if kind == "progress":
            progress(payload)  # raising here stops every rank (the finally below)
            if reply:
                acks.put(None)  # rank 0 waits for it: the run stops where progress raised
        else:
            outcome.setdefault(kind, payload)  # the first error is the cause

    def drain(*, reply: bool) -> None:
        while True:
            try:
                kind, payload = messages.get_nowait()
            except queue_module.Empty:
                return
            handle(kind, payload, reply=reply)

    try:
        while True:  # ends when every rank exited (join raises if one failed)
            try:
                handle(*messages.get(timeout=POLL_SECONDS))
                continue
            except queue_module.Empty:
                pass
            try:
                if processes.join(timeout=0):
                    break
            except Exception as failure:
                outcome.pop("result", None)
                drain(reply=False)
                error = outcome.get("error")
                if isinstance(error, BulwarkError):
                    raise error from None
                raise TrainingError(f"a training process failed: {failure}") from None
        drain(reply=False)
    finally:
        for process in processes.processes:  # no-ops once they exited
            if process.is_alive():
                process.terminate()
        for process in processes.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        messages.close()
        acks.close()
    result: PretrainResult | None = outcome.get("result")
    if result is None:
        raise TrainingError("the training processes ended without rank 0's result")
    return replace(result, seconds=time.perf_counter() - started)


def _rank_main(
    rank: int,
    config: PretrainConfig,
    out_dir: Path,
    work_dir: Path,
    dataset: ImageDataset | None,
    devices: list[torch.device],
    backend: str,
    address: str,
    threads: int,
    messages: Any,
    acks: Any,
) -> None:
    """One rank: join the group, train its slices, send rank 0's progress and result."""
    from core.errors import BulwarkError
    from core.train import train_process

    _die_with_parent()
    torch.set_num_threads(threads)
    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=address,
        rank=rank,
        world_size=len(devices),
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:

        def report(update: Progress) -> None:
            # Synchronous, as in one process: rank 0 goes on once the launcher's callback
            # returned, so a callback that raises stops the run at this very report.
            messages.put(("progress", update))
            acks.get()

        result = train_process(
            config,
            out_dir=out_dir,
            work_dir=work_dir,
            progress=report if rank == 0 else ignore_progress,
            dataset=dataset,
            shard=Shard(rank, len(devices), device),
        )
        if rank == 0:
            messages.put(("result", result))
        # The ranks leave the group together: gloo aborts a process whose peer closed the
        # connection under it (seen as SIGABRT while rank 0 still wrote the checkpoint).
        dist.barrier()
    except BulwarkError as error:
        messages.put(("error", error))
        raise
    finally:
        dist.destroy_process_group()
    # Flush the queue's feeder thread before this process exits.
    messages.close()
    messages.join_thread()
