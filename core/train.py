"""Robust pre-training: train a feature extractor with one of the paper's defenses.

``pretrain(config, out_dir=...)`` reads the dataset, takes the pre-training part of the
paper's split, trains with SGD (momentum, weight decay, step schedule) under the defense's
loss, measures the test accuracy (Pre. Acc) and writes the hardened checkpoint
(``model.safetensors`` + ``manifest.json``). After every epoch it writes a resumable training
state (model, optimizer, scheduler, centroids, RNG state, epoch); calling ``pretrain`` again
with the same ``work_dir`` continues from the last finished epoch and ends with the same
weights as an uninterrupted run. With ``config.devices = N > 1`` the run is N processes, one
GPU each, whose optimization is the single process's (``core.distributed``).
"""

from __future__ import annotations

import json
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.checkpoint import MANIFEST_NAME, save_extractor
from core.config import PretrainConfig
from core.data import ImageDataset, augment, channel_stats, split_dataset, to_float
from core.datasets import load_dataset
from core.device import autocast, resolve_device, resolve_precision, uses_channels_last
from core.distributed import Shard, convert_batch_norm, sum_across_ranks
from core.errors import BulwarkError, ErrorKind
from core.losses import DefenseLoss, StepLoss
from core.models import FeatureClassifier, build_model
from core.progress import Progress, ProgressCallback, ignore_progress

STATE_NAME = "train_state.pt"
STATE_FORMAT = 2  # 2: the lr scheduler's state is saved with the optimizer's


class TrainingError(BulwarkError):
    """A run that cannot go on, with a message the user can act on."""

    kind = ErrorKind.TRAINING_FAILED


@dataclass(frozen=True)
class PretrainResult:
    model_dir: Path  # holds model.safetensors and manifest.json
    pre_acc: float  # clean test accuracy in [0,1]
    manifest: dict[str, Any]
    seconds: float  # wall time of this call (a resumed run counts only its own part)


@torch.no_grad()
def evaluate(
    model: FeatureClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    dtype: torch.dtype = torch.float32,
) -> float:
    """Clean accuracy of ``model`` on uint8 images ``x`` (N, C, H, W) and labels ``y``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        batch = to_float(x[start : start + batch_size].to(device))
        with autocast(device, dtype):
            logits = model(batch)
        correct += int((logits.argmax(1) == y[start : start + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def _state_config(config: PretrainConfig) -> dict[str, Any]:
    # Device, precision and the number of devices may change between an interrupted run and
    # its resumption (the optimization is the same on any number of devices).
    return config.model_dump(mode="json", exclude={"device", "precision", "devices"})


def pretrain(
    config: PretrainConfig,
    *,
    out_dir: Path,
    work_dir: Path | None = None,
    progress: ProgressCallback = ignore_progress,
    dataset: ImageDataset | None = None,
) -> PretrainResult:
    """Pre-train ``config.arch`` with ``config.defense`` and write the hardened checkpoint.

    Args:
        config: the full run description (see :class:`core.config.PretrainConfig`); with
            ``devices`` > 1 the run is that many processes (``core.distributed.launch``).
        out_dir: where ``model.safetensors`` and ``manifest.json`` go.
        work_dir: where the per-epoch resumable state lives (default ``out_dir``); a state
            there from the same config is resumed, one from another config is an error.
        progress: called after every step and epoch; raising from it stops the run, after
            which a new call resumes from the last finished epoch.
        dataset: the already-read dataset named by ``config`` (saves re-reading it).
    """
    work_dir = work_dir or out_dir
    if config.devices > 1:
        from core.distributed import launch

        return launch(
            config, out_dir=out_dir, work_dir=work_dir, progress=progress, dataset=dataset
        )
    result = train_process(
        config, out_dir=out_dir, work_dir=work_dir, progress=progress, dataset=dataset
    )
    assert result is not None  # the only process is rank 0
    return result


class _TrainStep(nn.Module):
    """The model and the defense's loss as one module, whose forward is a training step's
    loss: what ``DistributedDataParallel`` wraps, so that it averages the gradients of the
    model and of the PCL centroids alike."""

    def __init__(self, model: FeatureClassifier, criterion: DefenseLoss) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        joint: bool,
        generator: torch.Generator,
        autocast: AbstractContextManager,
        start_noise: torch.Tensor | None,
    ) -> StepLoss:
        result: StepLoss = self.criterion(
            self.model,
            x,
            y,
            joint=joint,
            generator=generator,
            autocast=autocast,
            start_noise=start_noise,
        )
        return result


def train_process(
    config: PretrainConfig,
    *,
    out_dir: Path,
    work_dir: Path,
    progress: ProgressCallback = ignore_progress,
    dataset: ImageDataset | None = None,
    shard: Shard | None = None,
) -> PretrainResult | None:
    """The training of one process: the whole run, or with ``shard`` one rank of a
    distributed run (in a process group; ``core.distributed``), which returns the result on
    rank 0 and None elsewhere. See :func:`pretrain` for the arguments."""
    started = time.perf_counter()
    device = shard.device if shard else resolve_device(config.device)
    dtype = resolve_precision(config.precision, device)
    lead = shard is None or shard.rank == 0  # reports progress, writes state and checkpoint

    progress(Progress(phase="loading data", fraction=0.0, message=config.dataset))
    data = dataset or load_dataset(config.dataset, config.data_dir)
    split_counts = config.resolved_split
    split = split_dataset(data.train_y, split_counts)
    train_x = data.train_x[split.pretrain].to(device)
    train_y = data.train_y[split.pretrain].to(device)
    mean, std = channel_stats(data.train_x[split.pretrain])

    torch.manual_seed(config.seed)
    model = build_model(
        config.arch, in_channels=data.channels, num_classes=data.num_classes, mean=mean, std=std
    )
    criterion = DefenseLoss(
        config.defense,
        num_classes=data.num_classes,
        feature_dim=model.feature_dim,
        alpha=config.alpha,
        epsilon=config.epsilon,
        pgd_steps=config.pgd_steps,
        pgd_step_size=config.step_size,
        random_start=config.random_start,
        feature_term=config.feature_term,
    )
    if shard:
        convert_batch_norm(model)  # batch norm over the global batch
    model.to(device)
    criterion.to(device)
    if uses_channels_last(device, dtype):
        # torch's stubs lack Module.to(memory_format=...), which it has since 1.5.
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    centroid_optimizer = torch.optim.SGD([criterion.centroids], lr=config.centroid_lr)
    # lr * lr_gamma ** (milestones passed), stepped once per finished epoch.
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.milestones), gamma=config.lr_gamma
    )
    generator = torch.Generator(device=device).manual_seed(config.seed)

    run = _RunState(model, criterion, optimizer, scheduler, centroid_optimizer, generator)
    state_path = work_dir / STATE_NAME
    start_epoch = _resume(state_path, config, run) if state_path.is_file() else 0

    step_module: nn.Module = _TrainStep(model, criterion)
    if shard:
        from torch.nn.parallel import DistributedDataParallel

        if not config.uses_pcl:
            criterion.centroids.requires_grad_(False)  # never trained: nothing to average
        step_module = DistributedDataParallel(
            step_module,
            device_ids=[device] if device.type == "cuda" else None,
            # The centroids get no gradient in the PCL warm-up epochs still to run.
            find_unused_parameters=config.uses_pcl and start_epoch < config.warmup_epochs,
        )
    draws_start_noise = shard is not None and criterion.adversarial and config.random_start

    steps_per_epoch = -(-len(train_x) // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    run_started, run_start_step = time.perf_counter(), start_epoch * steps_per_epoch
    loss_value = accuracy = 0.0
    for epoch in range(start_epoch, config.epochs):
        joint = config.uses_pcl and epoch >= config.warmup_epochs
        model.train()
        # The same on every rank: the order and the random draws are the global batch's.
        order = torch.randperm(len(train_x), device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for step in range(steps_per_epoch):
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = to_float(train_x[index])
            if config.augment:
                x = augment(x, flip=data.flip, generator=generator)
            y = train_y[index]
            start_noise = None
            if draws_start_noise:  # as pgd draws them in a single process
                start_noise = torch.rand(x.shape, device=device, generator=generator)
            weight = 1.0  # this process's loss's weight in the global batch's mean loss
            if shard:
                rows = shard.rows(len(y))
                weight = (rows.stop - rows.start) * shard.world_size / len(y)
                x, y = x[rows], y[rows]
                start_noise = None if start_noise is None else start_noise[rows]
            if uses_channels_last(device, dtype):
                x = x.contiguous(memory_format=torch.channels_last)
            result = step_module(
                x,
                y,
                joint=joint,
                generator=generator,
                autocast=autocast(device, dtype),
                start_noise=start_noise,
            )
            if len(y) and not torch.isfinite(result.loss):
                raise TrainingError(
                    f"the loss became {result.loss.item()} at epoch {epoch + 1}, step "
                    f"{step + 1}: lower lr (now {config.lr}) or alpha (now {config.alpha})"
                )
            optimizer.zero_grad(set_to_none=True)
            centroid_optimizer.zero_grad(set_to_none=True)
            # An empty slice (a last batch with fewer rows than ranks) has a NaN mean loss;
            # its weight is 0 and so is its gradient, but the NaN must not reach the product.
            loss = result.loss if weight == 1.0 else result.loss.nan_to_num() * weight
            loss.backward()
            optimizer.step()
            if joint:
                centroid_optimizer.step()
            if len(y):
                loss_sum += result.loss.detach() * len(y)
                correct += (result.logits.argmax(1) == y).sum()

            done = epoch * steps_per_epoch + step + 1
            elapsed = time.perf_counter() - run_started
            rate = (done - run_start_step) / elapsed if elapsed > 0 else 0.0
            progress(
                Progress(
                    phase="training",
                    fraction=0.98 * done / total_steps,
                    epoch=epoch + 1,
                    epochs=config.epochs,
                    step=step + 1,
                    steps=steps_per_epoch,
                    eta_seconds=(total_steps - done) / rate if rate > 0 else None,
                )
            )
        if shard:  # the epoch's loss and accuracy over every rank's rows
            loss_sum = sum_across_ranks(loss_sum)
            correct = sum_across_ranks(correct)
        seen = min(len(train_x), steps_per_epoch * config.batch_size)
        loss_value, accuracy = float(loss_sum) / seen, int(correct) / seen
        scheduler.step()
        if lead:
            _save_state(state_path, config, epoch + 1, run)
        progress(
            Progress(
                phase="training",
                fraction=0.98 * (epoch + 1) / config.epochs,
                message=f"epoch {epoch + 1}/{config.epochs} done",
                epoch=epoch + 1,
                epochs=config.epochs,
                loss=loss_value,
                accuracy=accuracy,
            )
        )
    if not lead:
        return None

    progress(Progress(phase="evaluating", fraction=0.98, message="test accuracy"))
    pre_acc = evaluate(model, data.test_x, data.test_y, dtype=dtype)
    manifest = {
        "kind": "pretrained-extractor",
        "dataset": config.dataset,
        "classes": list(data.classes),
        "input_shape": [data.channels, *data.input_size],
        "defense": config.defense,
        "seed": config.seed,
        "split": split_counts.model_dump(),
        "config": config.model_dump(mode="json"),
        "precision": str(dtype).removeprefix("torch."),
        "device": device.type,
        "pre_acc": pre_acc,
        "final_train_loss": loss_value,
        "final_train_accuracy": accuracy,
    }
    if config.uses_pcl:
        manifest["centroids"] = criterion.centroids.detach().cpu().tolist()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    save_extractor(out_dir, model, manifest)
    progress(Progress(phase="done", fraction=1.0, message=f"Pre. Acc {pre_acc:.4f}"))
    return PretrainResult(
        model_dir=out_dir,
        pre_acc=pre_acc,
        manifest=json.loads((out_dir / MANIFEST_NAME).read_text()),
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _RunState:
    """What changes from epoch to epoch, so what a resumed run must restore."""

    model: FeatureClassifier
    criterion: DefenseLoss  # holds the PCL centroids
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    centroid_optimizer: torch.optim.Optimizer
    generator: torch.Generator  # batch order, augmentation, PGD random starts


def _save_state(path: Path, config: PretrainConfig, epochs_done: int, run: _RunState) -> None:
    """Write the resumable state atomically (a crash mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": STATE_FORMAT,
        "config": _state_config(config),
        "epochs_done": epochs_done,
        "model": run.model.state_dict(),
        "criterion": run.criterion.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "centroid_optimizer": run.centroid_optimizer.state_dict(),
        "generator": run.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _resume(path: Path, config: PretrainConfig, run: _RunState) -> int:
    """Load the state at ``path`` into the run's objects; returns the epochs already done."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT or state.get("config") != _state_config(config):
        raise TrainingError(
            f"{path} holds a run with a different configuration; use another output "
            "directory or delete that file to start afresh"
        )
    run.model.load_state_dict(state["model"])
    run.criterion.load_state_dict(state["criterion"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.centroid_optimizer.load_state_dict(state["centroid_optimizer"])
    run.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["epochs_done"])
