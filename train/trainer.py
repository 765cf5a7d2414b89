"""RDCD distillation on Ray Train: the per-worker loop and the driver that launches it.

The driver resolves the data (online augmentation or a teacher cache), the step budget and
the schedule, then runs a TorchTrainer (DDP; gloo on CPU, NCCL on GPU). Each worker trains
on its shard; rank 0 writes checkpoints (student, momentum student, both queues, optimizer,
step) every N steps through Ray Train to any fsspec location, and the metric log beside
them. Re-running the same command resumes from the last checkpoint at the same step with the
same queues. At the end the driver exports the student as a model card (train.export).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

import torch

from rdcd import sources
from rdcd.losses import RDCDCriterion, SSCDCriterion
from rdcd.models import DescriptorModel, model_mean_std
from rdcd.runtime import init_ray
from rdcd.storage import (
    StorageOptions,
    get_filesystem,
    get_pyarrow_filesystem,
    join,
    read_manifest,
    strip_protocol,
    write_manifest,
)
from train.data import cached_dataset, online_dataset, read_exclude
from train.frozen import freeze_prefix
from train.metric_log import METRICS_CSV, MetricLog, mean_across_ranks
from train.objectives import Inputs, RDCDObjective, SSCDObjective, StudentNet
from train.schedule import learning_rate, peak_learning_rate
from train.settings import SettingsError, TrainSettings, from_config, with_absolute_paths
from train.student import build_student

STATE_FILE = "state.pt"
RUN_NAME = "ray"
"""Ray Train keeps its checkpoints under <output>/ray/."""


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it ('auto'), anywhere when forced ('bf16')."""
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def build_objective(settings: TrainSettings, model: DescriptorModel, net, device, teacher=None):
    mean, std = model_mean_std(settings.student.backbone)
    inputs = Inputs(mean, std, settings.student_size, device)
    amp = amp_dtype(settings.optim.amp, device)
    if settings.objective == "rdcd":
        criterion = RDCDCriterion(settings.rdcd_loss(), seed=settings.seed).to(device)
        return RDCDObjective(
            net,
            model,
            criterion,
            inputs,
            settings.loss["momentum"],
            teacher=teacher,
            amp=amp,
            frozen_blocks=settings.student.frozen_blocks,
        )
    return SSCDObjective(net, model, SSCDCriterion(settings.sscd_loss()), inputs, amp=amp)


def _save_state(objective, optimizer, step: int) -> dict[str, Any]:
    state = {name: module.state_dict() for name, module in objective.modules().items()}
    state["optimizer"] = optimizer.state_dict()
    state["step"] = step
    return state


def _restore_state(objective, optimizer, state: dict[str, Any]) -> int:
    for name, module in objective.modules().items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    settings = from_config(loop_config["config"])
    storage = StorageOptions.from_config(loop_config["config"]["storage"])
    total_steps = loop_config["total_steps"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if settings.scaling.threads:
        torch.set_num_threads(int(settings.scaling.threads))
    device = ray.train.torch.get_device()
    torch.manual_seed(settings.seed)
    model = build_student(settings.student)
    if settings.scaling.use_gpu and world > 1:
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    model = model.to(device).to(memory_format=torch.channels_last)
    freeze_prefix(model, settings.student.frozen_blocks)
    teacher = None
    if settings.needs_teacher() and not loop_config["cached"]:
        from rdcd.embedder import load_embedder

        embedder = load_embedder(
            settings.teacher,
            device="cuda" if device.type == "cuda" else "cpu",
            input_size=settings.augment.size,
            threads=settings.scaling.threads,
        )
        teacher = embedder.embed
    objective = build_objective(settings, model, None, device, teacher)
    optimizer = torch.optim.SGD(
        [param for param in model.parameters() if param.requires_grad],
        lr=0.0,
        momentum=settings.optim.momentum,
        weight_decay=settings.optim.weight_decay,
    )
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(
                os.path.join(directory, STATE_FILE), map_location=device, weights_only=True
            )
        step = _restore_state(objective, optimizer, state)
    objective.net = ray.train.torch.prepare_model(
        StudentNet(model, settings.student.frozen_blocks),
        move_to_device=False,
        parallel_strategy="ddp",
    )
    log = MetricLog.resume(settings.output, storage, step) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    peak = peak_learning_rate(settings.optim.base_lr, settings.global_batch)
    steps_per_epoch = loop_config["steps_per_epoch"]
    bar = tqdm(total=total_steps, desc=f"train {settings.objective}") if rank == 0 else None
    if bar is not None and step:
        bar.update(step)
    started, images = time.perf_counter(), 0
    if rank == 0 and step:
        print(f"resumed at step {step}", flush=True)
    while step < total_steps:
        batches = 0
        for batch in shard.iter_torch_batches(
            batch_size=settings.optim.batch_size,
            drop_last=True,
            local_shuffle_buffer_size=settings.data.shuffle_buffer or None,
        ):
            batches += 1
            lr = learning_rate(step, total_steps, loop_config["warmup_steps"], peak)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, stats = objective.loss(batch)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    optimizer.param_groups[0]["params"], settings.optim.grad_clip
                )
            optimizer.step()
            step += 1
            images += settings.global_batch
            stats = mean_across_ranks(stats, device)
            if log is not None:
                log.add(stats)
            if bar is not None:
                bar.update(1)
                bar.set_description(f"train {settings.objective} loss {stats['loss']:.4f}")
            if log is not None and (step % settings.log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - started
                log.close_interval(
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "lr": lr,
                        "images_per_s": round(images / max(elapsed, 1e-9), 2),
                    }
                )
                started, images = time.perf_counter(), 0
            if step % settings.checkpoint_every == 0 or step == total_steps:
                _checkpoint(objective, optimizer, step, stats, log, rank)
            if step >= total_steps:
                break
        if batches == 0:
            raise SettingsError(
                "a worker's shard holds less than one batch: lower train.optim.batch_size or "
                "scaling.num_workers, or add images"
            )
    if bar is not None:
        bar.close()


def _checkpoint(objective, optimizer, step: int, stats, log: MetricLog | None, rank: int) -> None:
    import ray.train

    metrics = {"step": step, **{k: float(v) for k, v in stats.items()}}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    if log is not None:
        log.publish()
    with tempfile.TemporaryDirectory() as directory:
        torch.save(_save_state(objective, optimizer, step), os.path.join(directory, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def plan_steps(settings: TrainSettings, images: int | None) -> dict[str, int]:
    """Total and warm-up steps from epochs (or max_steps) and the number of images."""
    optim = settings.optim
    if images is None:
        if optim.max_steps is None:
            raise SettingsError(
                "the number of training images is unknown for this input layout: set "
                "train.optim.max_steps (epochs need a count)"
            )
        steps_per_epoch = max(1, optim.max_steps)
    else:
        steps_per_epoch = images // settings.global_batch
        if steps_per_epoch == 0:
            raise SettingsError(
                f"{images} training images make no full global batch of "
                f"{settings.global_batch}: lower train.optim.batch_size or num_workers"
            )
    total = optim.max_steps or max(1, math.ceil(optim.epochs * steps_per_epoch))
    warmup = min(total - 1, round(optim.warmup_epochs * steps_per_epoch)) if total > 1 else 0
    return {
        "total_steps": total,
        "warmup_steps": max(0, warmup),
        "steps_per_epoch": steps_per_epoch,
    }


def _count_images(url: str, options, storage, exclude: frozenset[str]) -> int | None:
    listing = sources.list_inputs(url, options, storage)
    if listing.count is None:
        return None
    return sum(1 for name, _ in listing.objects if name not in exclude)


def prepare_data(settings: TrainSettings, config: dict[str, Any], storage: StorageOptions):
    """(dataset, image count or None, description) for the configured data path."""
    source_options = sources.SourceOptions.from_config(config["input"])
    exclude = read_exclude(settings.exclude, storage)
    max_pixels = int(config["preprocess"]["max_pixels"])
    if settings.data.cache:
        from train.teacher_cache import PrefixSpec, build_cache

        prefix = None
        if settings.data.cache_features:
            prefix = PrefixSpec(settings.student, settings.student_size)
        manifest = build_cache(
            input_url=settings.input,
            cache_url=settings.data.cache,
            source_options=source_options,
            storage=storage,
            augment=settings.augment,
            teacher=settings.teacher,
            views=settings.data.cache_views,
            seed=settings.seed,
            exclude=exclude,
            max_pixels=max_pixels,
            quality=settings.data.cache_quality,
            device="cuda" if settings.scaling.use_gpu else "cpu",
            actors=settings.data.teacher_actors,
            actor_num_cpus=settings.data.teacher_num_cpus,
            actor_threads=settings.data.teacher_threads,
            map_num_cpus=settings.data.map_num_cpus,
            prefix=prefix,
        )
        dataset = cached_dataset(
            settings.data.cache,
            storage,
            settings.student_size,
            settings.data.map_num_cpus,
            manifest.get("feature_shape"),
        )
        info = f"teacher cache {settings.data.cache} ({manifest['views_per_image']} views/image"
        info += ", prefix features)" if prefix else ")"
        return dataset, int(manifest["images"]), info, True
    dataset = online_dataset(
        settings.input,
        source_options,
        storage,
        settings.augment,
        exclude=exclude,
        max_pixels=max_pixels,
        num_cpus=settings.data.map_num_cpus,
    )
    images = _count_images(settings.input, source_options, storage, exclude)
    return dataset, images, "online augmentation", False


def run_training(config: dict[str, Any], address: str | None = None) -> dict[str, Any]:
    """Train (or resume), then export the model card; returns the run summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train.export import export_model

    described = from_config(config)
    config = with_absolute_paths(config)
    settings = from_config(config)
    storage = StorageOptions.from_config(config["storage"])
    started = time.perf_counter()
    done = read_manifest(settings.output, storage)
    recorded = json.loads(json.dumps(settings.to_dict()))
    if done and done.get("status") == "complete" and done.get("settings") == recorded:
        return {**done["summary"], "note": "already complete (same settings); nothing to do"}
    init_ray(config["ray"], address)
    dataset, images, data_info, cached = prepare_data(settings, config, storage)
    plan = plan_steps(settings, images)
    output_fs = get_pyarrow_filesystem(settings.output, storage)
    output_path = strip_protocol(settings.output)
    get_filesystem(settings.output, storage).makedirs(output_path, exist_ok=True)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config, "cached": cached, **plan},
        scaling_config=ScalingConfig(
            num_workers=settings.scaling.num_workers,
            use_gpu=settings.scaling.use_gpu,
            resources_per_worker={"CPU": settings.scaling.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=output_path,
            storage_filesystem=output_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=settings.checkpoints_kept),
            failure_config=FailureConfig(max_failures=settings.max_failures),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(
            os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True
        )
    card = export_model(settings, config, state, storage, described)
    summary = {
        "objective": settings.objective,
        "teacher": settings.teacher if settings.needs_teacher() else "none",
        "data": f"{settings.input} ({images if images is not None else '?'} images; {data_info})",
        "steps": f"{state['step']} (global batch {settings.global_batch}, "
        f"{plan['steps_per_epoch']} steps/epoch)",
        "final loss": result.metrics.get("loss"),
        "model": f"{join(settings.output, 'model')} ({card.model_id})",
        "threshold": card.threshold,
        "metrics": join(settings.output, METRICS_CSV),
        "train time (s)": round(time.perf_counter() - started, 1),
    }
    write_manifest(
        settings.output,
        {"status": "complete", "settings": settings.to_dict(), "summary": summary},
        storage,
    )
    return summary
