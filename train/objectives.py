"""One optimisation step of each objective, independent of Ray (tests drive it directly).

RDCD (METHOD.md §3, "one training step"): the student sees view x, the teacher's descriptor
of x is the target of L_rel, the momentum student (EMA, updated before the keys) sees x'
and its keys feed L_con / L_HN. SSCD: both views through the online network in one batch,
InfoNCE + KoLeo over them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdcd.losses import RDCDCriterion, SSCDCriterion
from rdcd.models import DescriptorModel
from train.frozen import forward_both, freeze_prefix

TeacherFn = Callable[[np.ndarray], np.ndarray]


class StudentNet(nn.Module):
    """The module DDP wraps: one forward returning (h, z), so gradient sync goes through
    DDP's own forward instead of a side method. x is images, or cached features of the
    frozen prefix when from_features."""

    def __init__(self, model: DescriptorModel, frozen_blocks: int = 0):
        super().__init__()
        self.model = model
        self.frozen_blocks = frozen_blocks

    def forward(
        self, x: torch.Tensor, from_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_both(self.model, x, self.frozen_blocks, from_features)


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float) -> None:
    """θ' ← m·θ' + (1 − m)·θ over parameters only (BN statistics evolve on their own)."""
    for target, source in zip(momentum.parameters(), online.parameters(), strict=True):
        target.mul_(m).add_(source.detach(), alpha=1.0 - m)


class Inputs:
    """uint8 NHWC batches -> normalised float NCHW (channels_last) at the student's size."""

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], size: int, device: torch.device
    ):
        self.size = size
        self.device = device
        self.shift = torch.tensor([255.0 * m for m in mean], device=device).view(1, 3, 1, 1)
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, 3, 1, 1)

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        x = (x - self.shift) * self.scale
        return x.contiguous(memory_format=torch.channels_last)


def view_input(
    inputs: Inputs, batch: dict[str, torch.Tensor], index: int
) -> tuple[torch.Tensor, bool]:
    """View `index` of the batch as network input, and whether it is prefix features."""
    features = batch.get(f"feat{index}")
    if features is not None:
        return features.to(inputs.device, non_blocking=True).float(), True
    return inputs(batch[f"view{index}"]), False


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class RDCDObjective:
    """Student + momentum student + teacher targets -> RDCD loss."""

    def __init__(
        self,
        net: nn.Module,
        model: DescriptorModel,
        criterion: RDCDCriterion,
        inputs: Inputs,
        momentum: float,
        teacher: TeacherFn | None = None,
        amp: torch.dtype | None = None,
        frozen_blocks: int = 0,
    ):
        self.net = net
        self.model = model
        self.criterion = criterion
        self.inputs = inputs
        self.m = momentum
        self.teacher = teacher
        self.amp = amp
        self.momentum_model = copy.deepcopy(model).requires_grad_(False).train()
        self.frozen_blocks = frozen_blocks
        freeze_prefix(self.momentum_model, frozen_blocks)

    def modules(self) -> dict[str, nn.Module]:
        """Everything a checkpoint must hold to resume exactly (queues live in criterion)."""
        return {"student": self.model, "momentum": self.momentum_model, "criterion": self.criterion}

    def teacher_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.criterion.needs_teacher:
            return None
        if "teacher" in batch:
            return batch["teacher"].to(self.inputs.device).float()
        if self.teacher is None:
            raise ValueError("L_rel is on but neither a teacher nor cached targets are given")
        targets = self.teacher(batch["view0"].cpu().numpy())
        return torch.from_numpy(np.asarray(targets, np.float32)).to(self.inputs.device)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        h_teacher = self.teacher_targets(batch)
        x, from_features = view_input(self.inputs, batch, 0)
        with autocast(self.inputs.device, self.amp):
            h_student, z = self.net(x, from_features)
        keys = None
        if self.criterion.student_queue is not None:
            x_prime, _ = view_input(self.inputs, batch, 1)
            momentum_update(self.model, self.momentum_model, self.m)
            with torch.no_grad(), autocast(self.inputs.device, self.amp):
                blocks = self.frozen_blocks
                keys = forward_both(self.momentum_model, x_prime, blocks, from_features)[1]
                keys = keys.float()
        image_keys = batch["image_key"].to(self.inputs.device)
        return self.criterion(h_student, z, h_teacher, keys, image_keys)


class SSCDObjective:
    """Both views through the online network; InfoNCE + KoLeo over the global batch."""

    def __init__(
        self,
        net: nn.Module,
        model: DescriptorModel,
        criterion: SSCDCriterion,
        inputs: Inputs,
        amp: torch.dtype | None = None,
    ):
        self.net = net
        self.model = model
        self.criterion = criterion
        self.inputs = inputs
        self.amp = amp

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.model}

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        first, from_features = view_input(self.inputs, batch, 0)
        second, _ = view_input(self.inputs, batch, 1)
        with autocast(self.inputs.device, self.amp):
            _, z = self.net(torch.cat([first, second]), from_features)
        first, second = z.float().chunk(2)
        return self.criterion([first, second], batch["image_key"].to(self.inputs.device))
