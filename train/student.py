"""Building the student network from the `train.student` settings.

The trunk starts from ImageNet weights; with `init_from` the whole network (trunk, kd head,
projector) starts from a saved model card instead, e.g. the zero-training PCA default, so a
short run starts from a working descriptor rather than random heads. PCA projectors are
ordered by variance: a card with a wider projector initialises a narrower student with its
leading rows.
"""

from __future__ import annotations

from rdcd.cards import load_model
from rdcd.models import DescriptorModel
from train.settings import StudentSettings


def build_student(settings: StudentSettings) -> DescriptorModel:
    model = DescriptorModel(
        settings.backbone,
        kd_dim=settings.kd_dim,
        dim=settings.dim,
        gem_p=settings.gem_p,
        pretrained=settings.weights if not settings.init_from else False,
        dropout=settings.dropout,
    )
    if settings.init_from:
        initialise_from_card(model, settings.init_from)
    return model


def initialise_from_card(model: DescriptorModel, spec: str) -> None:
    source, card = load_model(spec)
    arch = card.architecture
    if (arch.backbone, arch.kd_dim, arch.gem_p) != (model.backbone_name, model.kd_dim, model.gem_p):
        raise ValueError(
            f"student.init_from {spec} is a {arch.backbone} kd_dim {arch.kd_dim} gem_p "
            f"{arch.gem_p} model; the student is {model.backbone_name} kd_dim {model.kd_dim} "
            f"gem_p {model.gem_p}"
        )
    if arch.dim < model.dim:
        raise ValueError(f"student.init_from {spec} has dim {arch.dim} < student dim {model.dim}")
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("whitening.")}
    state["projector.weight"] = state["projector.weight"][: model.dim]
    state["projector.bias"] = state["projector.bias"][: model.dim]
    model.load_state_dict(state)
