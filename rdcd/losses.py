"""The training objectives of RDCD and of its no-teacher baseline (METHOD.md §2).

RDCD (``RDCDCriterion``): relational distillation L_rel against a queue of teacher
descriptors, MoCo InfoNCE L_con on the compact descriptor against a queue of momentum keys,
and the hard-negative term L_HN on the most similar key; L = λ_rel·L_rel + λ_con·(L_con +
λ_HN·L_HN). SSCD (``SSCDCriterion``): InfoNCE over two views with in-batch negatives plus
KoLeo, the paper's baseline at the same d.

Queues hold rows gathered from every rank, so they are identical across DDP workers and
a checkpoint of rank 0 restores all of them. Each queue is read from a snapshot taken before
the batch is enqueued (the current batch never meets itself) and accepts any batch size
(FIFO with wrap-around). Each entry also remembers the image it came from: on a small
corpus the queue holds other views of the same image, which are not negatives and are masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NO_IMAGE = -1
"""Image key of the random vectors a queue starts with: never equal to a real key."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_rows(rows: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """Concatenate rows from every rank (rank order); ranks may hold different counts.

    With differentiable=True gradients flow back to the rank that produced each row (the
    SSCD loss needs this); queue updates use the plain, gradient-free gather.
    """
    if not distributed():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = rows
    if rows.shape[0] < max(sizes):
        filler = rows.new_zeros((max(sizes) - rows.shape[0], *rows.shape[1:]))
        padded = torch.cat([rows, filler])
    if differentiable:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


class FeatureQueue(nn.Module):
    """A FIFO of unit vectors and the image keys they came from, kept in module buffers
    (so state_dict() checkpoints them with the pointer)."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got {size} x {dim}")
        # The same seed on every rank: the queues start (and stay) identical across workers.
        generator = torch.Generator().manual_seed(seed)
        start = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("features", start)
        self.register_buffer("image_keys", torch.full((size,), NO_IMAGE, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy to compute against, so enqueueing afterwards cannot alter the loss graph."""
        return self.features.detach().clone(), self.image_keys.clone()

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, image_keys: torch.Tensor) -> None:
        """Append rows from all ranks at the pointer, overwriting the oldest (wraps)."""
        features = all_gather_rows(features.detach().to(self.features.dtype))
        image_keys = all_gather_rows(image_keys.to(self.image_keys.device, torch.long))
        if features.shape[0] > self.size:
            features, image_keys = features[-self.size :], image_keys[-self.size :]
        slots = self.pointer + torch.arange(features.shape[0], device=self.features.device)
        slots = slots % self.size
        self.features[slots] = features
        self.image_keys[slots] = image_keys
        self.pointer.copy_((self.pointer + features.shape[0]) % self.size)


def same_image_mask(
    image_keys: torch.Tensor | None, queue_keys: torch.Tensor
) -> torch.Tensor | None:
    """(B, K) True where a queue entry is a view of the query's own image."""
    if image_keys is None:
        return None
    return image_keys.view(-1, 1).to(queue_keys.device) == queue_keys.view(1, -1)


def relational_kl(
    student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, tau: float = 0.04
) -> torch.Tensor:
    """L_rel = (1/B) Σ_i KL(softmax(h^T_i·Q/τ) ‖ softmax(h^S_i·Q/τ)); the teacher is a constant."""
    log_p_student = F.log_softmax(student.float() @ bank.T / tau, dim=1)
    log_p_teacher = F.log_softmax(teacher.detach().float() @ bank.T / tau, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def moco_infonce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    bank: torch.Tensor,
    tau: float = 0.07,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_con: cross-entropy of the positive key against the queue's negatives (masked out
    where mask is True), one direction, mean over the batch."""
    positive = (queries * keys.detach()).sum(dim=1, keepdim=True)
    negatives = queries @ bank.T
    if mask is not None:
        negatives = negatives.masked_fill(mask, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1).float() / tau
    target = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    return F.cross_entropy(logits, target)


def hardest_similarity(
    queries: torch.Tensor, bank: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """max_k ⟨z_i, n_k⟩ over the queue (masked entries excluded; -1 when all are masked)."""
    similarities = queries @ bank.T
    if mask is not None:
        similarities = similarities.masked_fill(mask, -1.0)
    return similarities.max(dim=1).values


def hard_negative_loss(
    queries: torch.Tensor,
    bank: torch.Tensor,
    mask: torch.Tensor | None = None,
    floor: float = 1e-3,
) -> torch.Tensor:
    """L_HN = −(1/B) Σ_i log(max(1 − max_k ⟨z_i, n_k⟩, floor)): push the nearest key away."""
    hardest = hardest_similarity(queries, bank, mask).float()
    return -torch.log((1.0 - hardest).clamp(min=floor)).mean()


def sscd_infonce(
    embeddings: torch.Tensor,
    instance: torch.Tensor,
    tau: float = 0.05,
    rows: slice | None = None,
) -> torch.Tensor:
    """SSCD's InfoNCE over all views: positives share an instance id, every other view is a
    negative, self excluded; per row averaged over its positives (METHOD.md §2.5).

    rows selects the rows this rank is responsible for (all by default); the columns always
    span every embedding, which is what a gathered batch gives each rank.
    """
    rows = rows or slice(None)
    query = embeddings[rows]
    query_instance = instance[rows]
    similarities = (query @ embeddings.T).float() / tau
    same = query_instance.view(-1, 1) == instance.view(1, -1)
    own = torch.zeros_like(same)
    own[torch.arange(query.shape[0]), torch.arange(embeddings.shape[0])[rows]] = True
    positives = same & ~own
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every view needs at least one other view of the same image")
    negative_lse = torch.logsumexp(similarities.masked_fill(same, float("-inf")), dim=1)
    noise = torch.logaddexp(negative_lse, torch.full_like(negative_lse, math.log(1e-6)))
    log_denominator = torch.logaddexp(similarities, noise.view(-1, 1))
    log_ratio = (similarities - log_denominator).masked_fill(~positives, 0.0)
    per_row = log_ratio.sum(dim=1) / positives.sum(dim=1)
    return -per_row.mean()


def koleo_loss(
    embeddings: torch.Tensor,
    instance: torch.Tensor,
    rows: slice | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """SSCD's KoLeo: −mean_i log √max(2 − 2·max_{k ∈ N(i)} ⟨e_i, e_k⟩, eps) over other
    images' views N(i); spreads descriptors over the sphere."""
    rows = rows or slice(None)
    query = embeddings[rows]
    similarities = (query @ embeddings.T).float()
    same = instance[rows].view(-1, 1) == instance.view(1, -1)
    nearest = similarities.masked_fill(same, -1.0).max(dim=1).values
    return -(0.5 * torch.log((2.0 - 2.0 * nearest).clamp(min=eps))).mean()


@dataclass(frozen=True)
class RDCDSettings:
    """Weights, temperatures, queue sizes and ablation switches of the RDCD objective."""

    kd_dim: int = 512
    dim: int = 128
    tau_rel: float = 0.04
    tau_con: float = 0.07
    rel_weight: float = 1.0
    con_weight: float = 1.0
    hn_weight: float = 5.0
    use_rel: bool = True
    use_con: bool = True
    use_hn: bool = True
    teacher_queue: int = 65536
    student_queue: int = 65536
    mask_same_image: bool = True
    hn_floor: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.use_rel or self.use_con or self.use_hn):
            raise ValueError("the RDCD objective needs at least one of L_rel, L_con, L_HN")
        if min(self.tau_rel, self.tau_con) <= 0:
            raise ValueError("temperatures must be positive")


class RDCDCriterion(nn.Module):
    """L = λ_rel·L_rel + λ_con·(L_con + λ_HN·L_HN) with the two queues it owns."""

    def __init__(self, settings: RDCDSettings, seed: int = 0):
        super().__init__()
        self.settings = settings
        self.teacher_queue = None
        if settings.use_rel:
            self.teacher_queue = FeatureQueue(settings.teacher_queue, settings.kd_dim, seed)
        self.student_queue = (
            FeatureQueue(settings.student_queue, settings.dim, seed + 1)
            if settings.use_con or settings.use_hn
            else None
        )

    @property
    def needs_teacher(self) -> bool:
        return self.settings.use_rel

    def forward(
        self,
        h_student: torch.Tensor | None,
        z: torch.Tensor,
        h_teacher: torch.Tensor | None,
        keys: torch.Tensor | None,
        image_keys: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for one batch, then both queues advance. Returns (loss, logged statistics)."""
        s = self.settings
        stats: dict[str, float] = {}
        z = z.float()
        h_student = h_student.float() if h_student is not None else None
        keys = keys.float() if keys is not None else None
        total = z.new_zeros(())
        if self.teacher_queue is not None:
            if h_student is None or h_teacher is None:
                raise ValueError("L_rel needs the student's kd output and the teacher's")
            bank, _ = self.teacher_queue.snapshot()
            rel = relational_kl(h_student, h_teacher, bank, s.tau_rel)
            total = total + s.rel_weight * rel
            stats["loss_rel"] = rel.item()
            stats["teacher_agreement"] = (h_student.detach() * h_teacher).sum(1).mean().item()
        if self.student_queue is not None:
            if keys is None:
                raise ValueError("the student queue holds momentum keys: pass keys")
            bank, bank_keys = self.student_queue.snapshot()
            mask = same_image_mask(image_keys, bank_keys) if s.mask_same_image else None
            contrastive = z.new_zeros(())
            if s.use_con:
                con = moco_infonce(z, keys, bank, s.tau_con, mask)
                contrastive = contrastive + con
                stats["loss_con"] = con.item()
            if s.use_hn:
                hn = hard_negative_loss(z, bank, mask, s.hn_floor)
                contrastive = contrastive + s.hn_weight * hn
                stats["loss_hn"] = hn.item()
            total = total + s.con_weight * contrastive
            with torch.no_grad():
                stats["sim_neg"] = (z.detach() @ bank.T).mean().item()
                stats["sim_hard_neg"] = hardest_similarity(z.detach(), bank, mask).mean().item()
        if keys is not None:
            stats["sim_pos"] = (z.detach() * keys.detach()).sum(1).mean().item()
        if self.teacher_queue is not None:
            self.teacher_queue.enqueue(h_teacher, image_keys)
        if self.student_queue is not None:
            self.student_queue.enqueue(keys, image_keys)
        stats["loss"] = total.item()
        return total, stats


@dataclass(frozen=True)
class SSCDSettings:
    """The no-teacher baseline: InfoNCE over views with in-batch negatives + KoLeo."""

    tau: float = 0.05
    koleo_weight: float = 10.0

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError("the InfoNCE temperature must be positive")


class SSCDCriterion(nn.Module):
    """L = L_InfoNCE + λ·L_KoLeo over the views of the global batch (gathered with gradients)."""

    def __init__(self, settings: SSCDSettings):
        super().__init__()
        self.settings = settings

    def forward(
        self, views: list[torch.Tensor], image_keys: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        local = torch.cat(views).float()
        local_instance = image_keys.repeat(len(views)).to(local.device)
        rank_rows = slice(None)
        embeddings, instance = local, local_instance
        if distributed():
            embeddings = all_gather_rows(local, differentiable=True)
            instance = all_gather_rows(local_instance)
            start = self._offset(local.shape[0], local.device)
            rank_rows = slice(start, start + local.shape[0])
        infonce = sscd_infonce(embeddings, instance, self.settings.tau, rank_rows)
        koleo = koleo_loss(embeddings, instance, rank_rows)
        total = infonce + self.settings.koleo_weight * koleo
        with torch.no_grad():
            detached = embeddings.detach()
            sims = detached[rank_rows] @ detached.T
            same = instance[rank_rows].view(-1, 1) == instance.view(1, -1)
            own = torch.zeros_like(same)
            own[torch.arange(sims.shape[0]), torch.arange(detached.shape[0])[rank_rows]] = True
            stats = {
                "loss": total.item(),
                "loss_infonce": infonce.item(),
                "loss_koleo": koleo.item(),
                "sim_pos": sims[same & ~own].mean().item(),
                "sim_neg": sims[~same].mean().item() if bool((~same).any()) else 0.0,
                "sim_hard_neg": sims.masked_fill(same, -1.0).max(dim=1).values.mean().item(),
            }
        return total, stats

    @staticmethod
    def _offset(local_rows: int, device: torch.device) -> int:
        """Where this rank's rows start in the gathered matrix."""
        counts = all_gather_rows(torch.tensor([local_rows], device=device))
        return int(counts[: dist.get_rank()].sum().item())
