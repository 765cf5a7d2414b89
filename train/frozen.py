"""A frozen trunk prefix: the stem and the first k block stages keep their ImageNet weights.

Fine-tuning only the late stages costs far less per step (no backward through the
high-resolution early layers), and with a teacher cache the prefix output of every cached
view can itself be stored once, so a step runs only the trainable top of the network. That
is what makes distilling on a CPU practical. The prefix stays in eval mode (its BatchNorm
statistics are the pretrained ones), identical in the student and the momentum student.
Works for timm EfficientNet-style trunks (conv_stem, bn1, blocks, conv_head, bn2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rdcd.models import DescriptorModel

TRUNK_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")


def check_frozen_blocks(model: DescriptorModel, blocks: int) -> None:
    if blocks == 0:
        return
    trunk = model.backbone
    if not all(hasattr(trunk, part) for part in TRUNK_PARTS):
        raise ValueError(
            f"student.frozen_blocks needs an EfficientNet-style timm trunk "
            f"({', '.join(TRUNK_PARTS)}); {model.backbone_name} is not one"
        )
    if not 0 < blocks <= len(trunk.blocks):
        raise ValueError(
            f"student.frozen_blocks must be in 0..{len(trunk.blocks)} for "
            f"{model.backbone_name}, got {blocks}"
        )


def prefix_modules(model: DescriptorModel, blocks: int) -> list[nn.Module]:
    trunk = model.backbone
    return [trunk.conv_stem, trunk.bn1, *list(trunk.blocks)[:blocks]]


def freeze_prefix(model: DescriptorModel, blocks: int) -> None:
    """No gradients and eval-mode BatchNorm for the prefix (call after any .train())."""
    check_frozen_blocks(model, blocks)
    if blocks == 0:
        return
    for module in prefix_modules(model, blocks):
        module.requires_grad_(False)
        module.eval()


@torch.no_grad()
def prefix_features(model: DescriptorModel, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """The frozen prefix's output for normalised images x."""
    for module in prefix_modules(model, blocks):
        x = module(x)
    return x


def top_forward(
    model: DescriptorModel, features: torch.Tensor, blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) from prefix features: the trainable stages, GeM, kd head and projector."""
    trunk = model.backbone
    x = features
    for block in list(trunk.blocks)[blocks:]:
        x = block(x)
    x = trunk.bn2(trunk.conv_head(x))
    raw = model.kd_head(model.dropout(model.pool(x)))
    return F.normalize(raw, dim=-1), F.normalize(model.projector(raw), dim=-1)


def forward_both(
    model: DescriptorModel, x: torch.Tensor, blocks: int, from_features: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, z) from images, or from cached prefix features when from_features."""
    if from_features:
        return top_forward(model, x, blocks)
    if blocks:
        return top_forward(model, prefix_features(model, x, blocks), blocks)
    return model.forward_both(x)
