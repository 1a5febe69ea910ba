"""DenoisingContrastLoss against a literal float64 re-statement of ConMIM's loss (TencentARC/ConMIM
engine_for_pretraining.py, the training step): l2-normalised student and teacher patch features, per-image
logits student @ teacher^T / temp, the masked rows, label = own position, nn.CrossEntropyLoss (pooled mean)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mcbeit.objectives.denoising_contrast import DenoisingContrastLoss

pytestmark = pytest.mark.usefixtures("one_thread")

P = 16  # projector width of the test (the original's is 256)


def literal_original(student, teacher, mask, temp):
    """The original's step, restated: teacher features come from a no_grad forward, both are normalised,
    logits (B,N,N) = student @ teacher^T / temp, masked rows (M,N), labels arange(N) per image masked alike."""
    B, N, _ = student.shape
    teacher = F.normalize(teacher.detach(), p=2, dim=-1)                     # (B,N,P) no gradient
    student = F.normalize(student, p=2, dim=-1)                              # (B,N,P)
    logits = torch.matmul(student, teacher.permute(0, 2, 1)) / temp          # (B,N,N)
    rows = logits[mask]                                                      # (M,N)
    labels = torch.arange(N).unsqueeze(0).expand(B, -1)[mask]               # (M,)
    return nn.CrossEntropyLoss()(rows, labels), rows, labels


def random_mask(B, N, counts, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(N, generator=g)[:c]] = True
    return mask


def make_inputs(B, N, seed, dtype=torch.float64, correlated=0.0):
    """Student (B,N,P) leaf with grad; teacher (B,N,P) leaf with requires_grad=True (to see that it gets none).
    ``correlated`` > 0 pulls each student patch towards its teacher patch (so acc is neither 0 nor 1)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(B, N, P, generator=g, dtype=dtype)
    student = torch.randn(B, N, P, generator=g, dtype=dtype) + correlated * teacher
    return student.requires_grad_(True), teacher.requires_grad_(True)


def tolerance(loss):
    """float64 when the loss keeps the inputs' precision; a float32 loss (see test_keeps_float64) is 1e-6 off."""
    return dict(rtol=1e-12, atol=1e-12) if loss.dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)


CASES = [  # (B, N, masked counts per image): 224 px (196 patches, 148 = random_mps32) and 128 px (64)
    (3, 196, (148, 148, 148)),
    (4, 196, (148, 1, 97, 0)),      # ragged, an image with one and one with no masked patch
    (3, 64, (48, 7, 64)),           # an image with every patch masked
    (2, 64, (0, 30)),
]


@pytest.mark.parametrize("temp", [0.1, 0.7])
@pytest.mark.parametrize("B, N, counts", CASES)
def test_matches_literal_original_loss_and_gradients(B, N, counts, temp):
    student, teacher = make_inputs(B, N, seed=N + B, correlated=1.5)
    mask = random_mask(B, N, counts, seed=B)
    out = DenoisingContrastLoss(temp)(student, teacher, mask)
    (grad,) = torch.autograd.grad(out["loss"], student)

    ref, rows, labels = literal_original(student, teacher, mask, temp)
    (ref_grad,) = torch.autograd.grad(ref, student)
    tol = tolerance(out["loss"])
    assert out["loss"].shape == ()
    torch.testing.assert_close(out["loss"].double(), ref, **tol)
    torch.testing.assert_close(grad, ref_grad, **tol)
    # only the masked patches of the student are in the loss
    assert torch.count_nonzero(grad[~mask]) == 0
    assert torch.count_nonzero(grad[mask].abs().sum(-1)) == mask.sum()

    # acc: the share of masked patches whose most similar teacher patch is their own
    expected_acc = sum(int(r.argmax()) == int(lab) for r, lab in zip(rows, labels, strict=True)) / len(labels)
    assert float(out["acc"]) == pytest.approx(expected_acc, abs=1e-6)  # acc is float32
    assert 0.0 < expected_acc < 1.0  # the inputs make acc informative


def test_acc_is_one_when_student_is_teacher_and_zero_when_shifted():
    student, teacher = make_inputs(2, 64, seed=3)
    mask = random_mask(2, 64, (20, 5), seed=1)
    loss = DenoisingContrastLoss(0.1)
    assert float(loss(teacher.detach().clone(), teacher, mask)["acc"]) == 1.0
    shifted = teacher.detach().roll(1, dims=1)  # each patch equals its neighbour's teacher
    assert float(loss(shifted, teacher, mask)["acc"]) == 0.0


def test_keeps_float64():
    """The loss of float64 features is computed in float64 (mixed precision upcasts fp16/bf16 to float32)."""
    student, teacher = make_inputs(2, 64, seed=0)
    mask = random_mask(2, 64, (10, 3), seed=0)
    out = DenoisingContrastLoss(0.1)(student, teacher, mask)
    assert out["loss"].dtype == torch.float64
    ref, _, _ = literal_original(student, teacher, mask, 0.1)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_give_a_float32_loss_close_to_the_literal(dtype):
    student, teacher = make_inputs(2, 196, seed=5, correlated=1.0)
    mask = random_mask(2, 196, (148, 148), seed=5)
    out = DenoisingContrastLoss(0.1)(student.detach().to(dtype), teacher.detach().to(dtype), mask)
    assert out["loss"].dtype == torch.float32
    ref, _, _ = literal_original(student.detach().to(dtype).double(), teacher.detach().to(dtype).double(), mask, 0.1)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out["loss"].double(), ref, rtol=tol, atol=tol)


def test_teacher_gets_no_gradient():
    student, teacher = make_inputs(2, 64, seed=1)
    mask = random_mask(2, 64, (48, 48), seed=1)
    out = DenoisingContrastLoss(0.1)(student, teacher, mask)
    out["loss"].backward()
    assert teacher.grad is None or torch.count_nonzero(teacher.grad) == 0
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0


def test_negatives_are_only_patches_of_the_same_image():
    B, N = 3, 64
    student, teacher = make_inputs(B, N, seed=2, correlated=1.0)
    only_first = random_mask(B, N, (40, 0, 0), seed=2)
    loss = DenoisingContrastLoss(0.1)
    base = loss(student, teacher, only_first)["loss"]
    other = teacher.detach().clone()
    other[1:] = torch.randn(B - 1, N, P, dtype=other.dtype, generator=torch.Generator().manual_seed(9))
    other_students = student.detach().clone()
    other_students[1:] = -other_students[1:]
    # image 0's loss sees neither the other images' teacher patches nor their student patches
    assert torch.equal(loss(student, other, only_first)["loss"], base)
    assert torch.equal(loss(other_students, teacher, only_first)["loss"], base)
    # ... but all of its own teacher's patches, visible and masked alike (they are its negatives)
    own = teacher.detach().clone()
    visible = (~only_first[0]).nonzero()[0, 0]
    own[0, visible] = torch.randn(P, dtype=own.dtype)
    assert not torch.allclose(loss(student, own, only_first)["loss"], base)
    # and it is the per-image literal: one image alone gives the same value
    alone = loss(student[:1], teacher[:1], only_first[:1])["loss"]
    torch.testing.assert_close(alone, base, rtol=0, atol=0)


def test_scale_of_features_does_not_matter():
    """Both sides are l2-normalised per patch: rescaling any patch changes nothing."""
    student, teacher = make_inputs(2, 64, seed=4)
    mask = random_mask(2, 64, (16, 50), seed=4)
    loss = DenoisingContrastLoss(0.1)
    g = torch.Generator().manual_seed(0)
    scale_s = torch.rand(2, 64, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    scale_t = torch.rand(2, 64, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    a = loss(student, teacher, mask)["loss"]
    b = loss(student * scale_s, teacher * scale_t, mask)["loss"]
    torch.testing.assert_close(a, b, **tolerance(a))


@pytest.mark.parametrize("student_shape, teacher_shape, mask_shape", [
    ((2, 64, P), (2, 64, P + 1), (2, 64)),
    ((2, 64, P), (2, 63, P), (2, 64)),
    ((2, 64, P), (3, 64, P), (2, 64)),
    ((2, 64, P), (2, 64, P), (2, 63)),
    ((2, 64, P), (2, 64, P), (3, 64)),
    ((2, 64, P), (2, 64, P), (2, 8, 8)),
    ((2, 64, P), (2, 64, P), (128,)),
])
def test_bad_shapes_raise(student_shape, teacher_shape, mask_shape):
    mask = torch.zeros(mask_shape, dtype=torch.bool).flatten()
    mask[::3] = True
    with pytest.raises(ValueError, match="must be"):
        DenoisingContrastLoss()(torch.randn(student_shape), torch.randn(teacher_shape), mask.reshape(mask_shape))


def test_no_masked_patch_raises():
    student, teacher = make_inputs(2, 64, seed=0)
    with pytest.raises(ValueError, match="no masked patch"):
        DenoisingContrastLoss()(student, teacher, torch.zeros(2, 64, dtype=torch.bool))


@pytest.mark.parametrize("temp", [0.0, -0.1])
def test_temperature_must_be_positive(temp):
    with pytest.raises(ValueError, match="temperature"):
        DenoisingContrastLoss(temp)
    assert DenoisingContrastLoss().temp == 0.1  # --temp's default
