"""UperNet's segmentation loss against mmseg 0.11's reduction (a mean over ALL pixels, ignored ones included)."""
import math

import pytest
import torch
import torch.nn.functional as F

from mcbeit.errors import ConfigError, InputError
from mcbeit.objectives.segmentation import UperNetLoss, segmentation_loss, upernet_loss


# ---- literal restatement of mmseg 0.11: decode_heads/decode_head.py L214-234 (losses), losses/cross_entropy_loss.py
# ---- L9-32 (cross_entropy), losses/utils.py L7-55 (weight_reduce_loss, reduction='mean', no weight/avg_factor),
# ---- losses/accuracy.py L4-48 (topk=1, thresh=None)
def mmseg_cross_entropy(pred, label, ignore_index=-100):
    loss = F.cross_entropy(pred, label, weight=None, reduction='none', ignore_index=ignore_index)
    loss = loss.mean()  # weight_reduce_loss(loss, weight=None, reduction='mean', avg_factor=None) -> reduce_loss
    return loss


def mmseg_accuracy(pred, target):
    pred_value, pred_label = pred.topk(1, dim=1)
    pred_label = pred_label.transpose(0, 1)
    correct = pred_label.eq(target.unsqueeze(0).expand_as(pred_label))
    correct_k = correct[:1].view(-1).float().sum(0, keepdim=True)
    return correct_k.mul_(100.0 / target.numel())


def mmseg_losses(seg_logit, seg_label, loss_weight=1.0, ignore_index=255):
    seg_logit = F.interpolate(seg_logit, size=seg_label.shape[2:], mode='bilinear', align_corners=False)
    seg_label = seg_label.squeeze(1)
    loss_seg = loss_weight * mmseg_cross_entropy(seg_logit, seg_label, ignore_index=ignore_index)
    acc_seg = mmseg_accuracy(seg_logit, seg_label)
    return loss_seg, acc_seg
# ---- end of the restatement


def random_batch(seed, B=2, C=5, h=4, w=6, H=16, W=24, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, h, w, generator=g) * 3
    label = torch.randint(0, C, (B, H, W), generator=g)
    label[torch.rand(B, H, W, generator=g) < ignored] = 255
    label[:, :, -5:] = 255  # a padded strip, as a crop smaller than the crop size gets
    return logits, label


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_all_pixels_is_mmseg_reduction_and_accuracy(seed):
    logits, label = random_batch(seed)
    loss, acc = segmentation_loss(logits, label)
    ref_loss, ref_acc = mmseg_losses(logits, label[:, None])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(acc, ref_acc[0], rtol=1e-6, atol=1e-6)
    # the auxiliary head's weight multiplies the same reduction
    torch.testing.assert_close(segmentation_loss(logits, label, weight=0.4)[0], mmseg_losses(logits, label[:, None], 0.4)[0])


def test_valid_average_is_cross_entropy_mean_and_differs_by_the_valid_fraction():
    logits, label = random_batch(3)
    up = F.interpolate(logits, size=label.shape[-2:], mode='bilinear', align_corners=False)
    valid, _ = segmentation_loss(logits, label, average='valid')
    torch.testing.assert_close(valid, F.cross_entropy(up, label, ignore_index=255))
    all_pixels, _ = segmentation_loss(logits, label)
    fraction = (label != 255).float().mean()
    torch.testing.assert_close(all_pixels, valid * fraction)
    assert fraction < 0.7  # the two reductions really differ on this batch


def test_hand_computed_example():
    """Two classes, equal logits except one confident pixel: -log(1/2) per uncertain valid pixel."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = 100.0  # pixel (0,0): class 1, loss ~0
    label = torch.tensor([[[1, 0], [255, 1]]])
    loss, acc = segmentation_loss(logits, label)  # same size: no resize effect
    assert loss.item() == pytest.approx(2 * math.log(2) / 4, rel=1e-6)  # (0 + log2 + 0 + log2) / 4 pixels
    assert segmentation_loss(logits, label, average='valid')[0].item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)
    # argmax: (0,0) -> 1 correct, (0,1) tie -> 0 correct, (1,0) ignored, (1,1) -> 0 wrong: 2 of 4 pixels
    assert acc.item() == pytest.approx(50.0)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    label = torch.full((1, 8, 8), 255)
    for average in ('all_pixels', 'valid'):
        loss, acc = segmentation_loss(logits, label, average=average)
        assert loss.item() == 0.0 and acc.item() == 0.0
        loss.backward()


def test_upernet_total_is_main_plus_weighted_aux_and_both_get_gradients():
    logits, label = random_batch(4)
    aux = torch.randn(2, 5, 2, 3, requires_grad=True)
    logits.requires_grad_(True)
    total, parts = upernet_loss(logits, aux, label)
    assert set(parts) == {'loss_seg', 'loss_aux', 'acc_seg'}
    torch.testing.assert_close(parts['loss_seg'], mmseg_losses(logits, label[:, None])[0])
    torch.testing.assert_close(parts['loss_aux'], mmseg_losses(aux, label[:, None], 0.4)[0])
    torch.testing.assert_close(total, parts['loss_seg'] + parts['loss_aux'])
    total.backward()
    assert logits.grad.abs().sum() > 0 and aux.grad.abs().sum() > 0
    assert not parts['acc_seg'].requires_grad
    # no auxiliary logits (evaluation mode): the main loss alone
    total, parts = UperNetLoss()(logits.detach(), None, label)
    assert set(parts) == {'loss_seg', 'acc_seg'} and torch.equal(total, parts['loss_seg'])


def test_low_precision_logits_give_a_float32_loss():
    logits, label = random_batch(5)
    loss, _ = segmentation_loss(logits.bfloat16(), label)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, segmentation_loss(logits.bfloat16().float(), label)[0])


def test_bad_input_is_a_clear_error():
    logits, label = random_batch(6)
    with pytest.raises(ConfigError, match='all_pixels'):
        segmentation_loss(logits, label, average='mean')
    with pytest.raises(ConfigError, match='all_pixels'):
        UperNetLoss(average='sum')
    with pytest.raises(InputError, match=r'\(B,H,W\)'):
        segmentation_loss(logits, label[:, None])
    with pytest.raises(InputError, match='integer'):
        segmentation_loss(logits, label.float())
