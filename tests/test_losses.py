"""The RDCD and SSCD losses against hand-computed values, their gradient paths, and the
queues (FIFO wrap-around, any batch size, identical on every rank under DDP)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from rdcd.losses import (
    NO_IMAGE,
    FeatureQueue,
    RDCDCriterion,
    RDCDSettings,
    SSCDCriterion,
    SSCDSettings,
    hard_negative_loss,
    koleo_loss,
    moco_infonce,
    relational_kl,
    sscd_infonce,
)
from rdcd.models import DescriptorModel

E = math.e


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_relational_kl_matches_hand_computation():
    bank = t([[1, 0], [0, 1]])
    teacher, student = t([[1, 0], [1, 0]]), t([[0, 1], [1, 0]])
    # Row 0: p_T = (a, b), p_S = (b, a) with a = e/(1+e), b = 1/(1+e): KL = (a - b)·log(a/b).
    # Row 1: identical distributions, KL = 0. batchmean divides by B = 2.
    a, b = E / (1 + E), 1 / (1 + E)
    expected = ((a - b) * math.log(a / b) + 0.0) / 2
    assert relational_kl(student, teacher, bank, tau=1.0).item() == pytest.approx(expected, 1e-6)
    # A lower temperature sharpens both distributions: the same mismatch costs more.
    assert relational_kl(student, teacher, bank, tau=0.5).item() > expected


def test_moco_infonce_matches_hand_computation_and_masks_same_image():
    z, key = t([[1, 0]]), t([[1, 0]])
    bank = t([[0, 1], [-1, 0]])
    expected = -math.log(E / (E + 1 + 1 / E))
    assert moco_infonce(z, key, bank, tau=1.0).item() == pytest.approx(expected, 1e-6)
    masked = moco_infonce(z, key, bank, tau=1.0, mask=torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(-math.log(E / (E + 1 / E)), 1e-6)
    # tau = 0.5 doubles every logit.
    sharp = -math.log(E**2 / (E**2 + 1 + E**-2))
    assert moco_infonce(z, key, bank, tau=0.5).item() == pytest.approx(sharp, 1e-6)


def test_hard_negative_uses_the_most_similar_key_and_floor():
    z = t([[1, 0]])
    bank = t([[0.6, 0.8], [0.8, 0.6]])
    assert hard_negative_loss(z, bank).item() == pytest.approx(-math.log(0.2), 1e-5)
    mask = torch.tensor([[False, True]])
    assert hard_negative_loss(z, bank, mask).item() == pytest.approx(-math.log(0.4), 1e-5)
    identical = t([[1, 0], [0, 1]])
    assert hard_negative_loss(z, identical).item() == pytest.approx(-math.log(1e-3), 1e-5)


def _sscd_reference(emb: torch.Tensor, inst: list[int], tau: float) -> float:
    """METHOD.md §2.5 written out with plain loops."""
    rows = []
    for i in range(len(inst)):
        pos = [j for j in range(len(inst)) if inst[j] == inst[i] and j != i]
        neg = [k for k in range(len(inst)) if inst[k] != inst[i]]
        s = lambda a, b: math.exp(float(emb[a] @ emb[b]) / tau)  # noqa: E731
        terms = [-math.log(s(i, j) / (s(i, j) + sum(s(i, k) for k in neg) + 1e-6)) for j in pos]
        rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


def test_sscd_infonce_matches_hand_computation():
    emb = t([[1, 0], [0, 1], [1, 0], [0, 1]])
    inst = torch.tensor([0, 1, 0, 1])
    expected = -math.log(E / (E + 2 + 1e-6))
    assert sscd_infonce(emb, inst, tau=1.0).item() == pytest.approx(expected, 1e-6)
    generator = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(6, 3, generator=generator), dim=1)
    labels = [0, 1, 2, 0, 1, 2]
    got = sscd_infonce(emb, torch.tensor(labels), tau=0.5).item()
    assert got == pytest.approx(_sscd_reference(emb, labels, 0.5), 1e-5)
    # Rows restricted to a slice (one rank's share) average only those rows.
    half = sscd_infonce(emb, torch.tensor(labels), tau=0.5, rows=slice(0, 3)).item()
    other = sscd_infonce(emb, torch.tensor(labels), tau=0.5, rows=slice(3, 6)).item()
    assert (half + other) / 2 == pytest.approx(got, 1e-5)


def test_sscd_infonce_refuses_a_view_without_positive():
    with pytest.raises(ValueError, match="at least one other view"):
        sscd_infonce(t([[1, 0], [0, 1]]), torch.tensor([0, 1]))


def test_koleo_matches_hand_computation():
    emb = t([[1, 0], [0.6, 0.8], [0, 1], [1, 0]])
    inst = torch.tensor([0, 1, 2, 0])
    # Nearest other-image similarity: 0.6, 0.8, 0.8, 0.6 (row 3's twin, row 0, is excluded).
    expected = -0.5 * (math.log(0.8) * 2 + math.log(0.4) * 2) / 4
    assert koleo_loss(emb, inst).item() == pytest.approx(expected, 1e-6)


def test_queue_is_fifo_with_wraparound_for_any_batch_size():
    queue = FeatureQueue(size=4, dim=2, seed=3)
    assert torch.allclose(queue.features.norm(dim=1), torch.ones(4))
    assert (queue.image_keys == NO_IMAGE).all()
    again = FeatureQueue(size=4, dim=2, seed=3)
    assert torch.equal(queue.features, again.features), "the seed fixes the initial queue"
    rows = F.normalize(torch.arange(1, 15, dtype=torch.float32).view(7, 2), dim=1)
    queue.enqueue(rows[:3], torch.tensor([0, 1, 2]))
    assert queue.pointer.item() == 3
    queue.enqueue(rows[3:6], torch.tensor([3, 4, 5]))
    assert queue.pointer.item() == 2
    assert queue.image_keys.tolist() == [4, 5, 2, 3]
    assert torch.equal(queue.features[0], rows[4])
    queue.enqueue(rows, torch.arange(10, 17))  # larger than the queue: keeps the newest 4
    assert sorted(queue.image_keys.tolist()) == [13, 14, 15, 16]
    assert set(queue.state_dict()) == {"features", "image_keys", "pointer"}


def test_snapshot_is_independent_of_later_enqueues():
    queue = FeatureQueue(size=3, dim=2)
    bank, keys = queue.snapshot()
    before = bank.clone()
    queue.enqueue(t([[1, 0], [0, 1], [1, 0]]), torch.tensor([1, 2, 3]))
    assert torch.equal(bank, before) and (keys == NO_IMAGE).all()


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DescriptorModel("test_resnet", kd_dim=16, dim=8)


def _grads(module) -> dict[str, bool]:
    return {
        name: param.grad is not None and bool(param.grad.abs().sum() > 0)
        for name, param in module.named_parameters()
    }


def test_relational_loss_trains_trunk_and_kd_head_but_not_projector(tiny_model):
    model = copy.deepcopy(tiny_model)
    x = torch.randn(4, 3, 32, 32)
    teacher = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    settings = RDCDSettings(kd_dim=16, dim=8, use_con=False, use_hn=False, teacher_queue=32)
    criterion = RDCDCriterion(settings)
    h, z = model.forward_both(x)
    loss, stats = criterion(h, z, teacher, None, torch.arange(4))
    loss.backward()
    grads = _grads(model)
    assert grads["kd_head.weight"] and any(v for k, v in grads.items() if k.startswith("backbone"))
    assert not grads["projector.weight"] and not grads["projector.bias"]
    assert teacher.grad is None
    assert not criterion.teacher_queue.features.requires_grad
    assert set(stats) >= {"loss", "loss_rel", "teacher_agreement"}


def test_contrastive_and_hard_negative_train_the_online_path_only(tiny_model):
    model = copy.deepcopy(tiny_model)
    momentum = copy.deepcopy(tiny_model).requires_grad_(False)
    settings = RDCDSettings(kd_dim=16, dim=8, use_rel=False, student_queue=32)
    criterion = RDCDCriterion(settings)
    x, x_prime = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    h, z = model.forward_both(x)
    keys = momentum(x_prime)
    loss, stats = criterion(h, z, None, keys, torch.arange(4))
    loss.backward()
    grads = _grads(model)
    assert grads["projector.weight"] and grads["kd_head.weight"]
    assert all(p.grad is None for p in momentum.parameters())
    assert criterion.teacher_queue is None
    assert {"loss_con", "loss_hn", "sim_pos", "sim_neg", "sim_hard_neg"} <= set(stats)


def test_rdcd_total_combines_the_terms_with_their_weights():
    generator = torch.Generator().manual_seed(1)
    h_s = F.normalize(torch.randn(5, 16, generator=generator), dim=1)
    h_t = F.normalize(torch.randn(5, 16, generator=generator), dim=1)
    z = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    keys = F.normalize(torch.randn(5, 8, generator=generator), dim=1)
    ids = torch.arange(5)
    settings = RDCDSettings(
        kd_dim=16,
        dim=8,
        rel_weight=2.0,
        con_weight=0.5,
        hn_weight=3.0,
        teacher_queue=64,
        student_queue=64,
    )
    criterion = RDCDCriterion(settings, seed=7)
    t_bank, _ = criterion.teacher_queue.snapshot()
    s_bank, _ = criterion.student_queue.snapshot()
    loss, stats = criterion(h_s, z, h_t, keys, ids)
    expected = 2.0 * relational_kl(h_s, h_t, t_bank, 0.04) + 0.5 * (
        moco_infonce(z, keys, s_bank, 0.07) + 3.0 * hard_negative_loss(z, s_bank)
    )
    assert loss.item() == pytest.approx(expected.item(), 1e-5)
    # Both queues advanced by the batch: teacher features and momentum keys.
    assert torch.allclose(criterion.teacher_queue.features[:5], h_t)
    assert torch.allclose(criterion.student_queue.features[:5], keys)
    assert criterion.student_queue.image_keys[:5].tolist() == [0, 1, 2, 3, 4]


def test_same_image_entries_are_not_negatives():
    settings = RDCDSettings(kd_dim=4, dim=2, use_rel=False, student_queue=2)
    criterion = RDCDCriterion(settings)
    z = t([[1, 0]])
    criterion.student_queue.enqueue(t([[1, 0], [0, 1]]), torch.tensor([7, 8]))
    _, stats = criterion(None, z, None, t([[1, 0]]), torch.tensor([7]))
    # The entry of image 7 (similarity 1) is masked: the hardest negative is image 8's.
    assert stats["sim_hard_neg"] == pytest.approx(0.0, abs=1e-6)
    unmasked = RDCDCriterion(
        RDCDSettings(kd_dim=4, dim=2, use_rel=False, student_queue=2, mask_same_image=False)
    )
    unmasked.student_queue.enqueue(t([[1, 0], [0, 1]]), torch.tensor([7, 8]))
    _, stats = unmasked(None, z, None, t([[1, 0]]), torch.tensor([7]))
    assert stats["sim_hard_neg"] == pytest.approx(1.0, abs=1e-6)


def test_sscd_criterion_trains_everything(tiny_model):
    model = copy.deepcopy(tiny_model)
    criterion = SSCDCriterion(SSCDSettings(tau=0.05, koleo_weight=10.0))
    both = model(torch.randn(8, 3, 32, 32))
    loss, stats = criterion([both[:4], both[4:]], torch.arange(4))
    loss.backward()
    grads = _grads(model)
    assert grads["projector.weight"] and grads["kd_head.weight"]
    assert math.isfinite(stats["loss"]) and stats["sim_pos"] <= 1.0


def test_settings_refuse_an_empty_objective():
    with pytest.raises(ValueError, match="at least one"):
        RDCDSettings(use_rel=False, use_con=False, use_hn=False)


def _ddp_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue = FeatureQueue(size=8, dim=2, seed=0)
        # Unequal batch sizes per rank: 3 rows on rank 0, 2 on rank 1.
        count = 3 if rank == 0 else 2
        rows = F.normalize(
            torch.full((count, 2), float(rank + 1)) + torch.arange(count)[:, None], dim=1
        )
        queue.enqueue(rows, torch.arange(count) + 10 * rank)
        # The SSCD loss gathers with gradients: the local rows receive them.
        emb = F.normalize(torch.randn(2, 2, generator=torch.Generator().manual_seed(rank)), dim=1)
        emb.requires_grad_()
        loss, _ = SSCDCriterion(SSCDSettings())([emb[:1], emb[1:]], torch.tensor([rank]))
        loss.backward()
        results[rank] = (
            queue.image_keys.tolist(),
            queue.pointer.item(),
            queue.features.tolist(),
            bool(emb.grad.abs().sum() > 0),
        )
    finally:
        dist.destroy_process_group()


def test_queues_gather_all_ranks_with_unequal_batches(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    keys0, pointer0, features0, grad0 = results[0]
    keys1, pointer1, features1, grad1 = results[1]
    assert keys0 == keys1 and features0 == features1, "queues must be identical on all ranks"
    assert keys0[:5] == [0, 1, 2, 10, 11] and keys0[5:] == [NO_IMAGE] * 3
    assert pointer0 == pointer1 == 5
    assert grad0 and grad1
