import math

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from model.losses import LogitParams, part_sigmoid_loss, whole_sigmoid_loss


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def test_whole_loss_equals_open_clip_siglip():
    img, txt = unit(16, 32, seed=1), unit(16, 32, seed=2)
    params = LogitParams()
    scale, bias = params.scale().double(), params.bias.double()
    ours = whole_sigmoid_loss(img, txt, scale, bias)
    theirs = SigLipLoss()(img, txt, scale, bias)
    assert abs(ours.item() - theirs.item()) < 1e-5
    assert abs(scale.item() - 1 / 0.07) < 1e-5 and bias.item() == -10


def test_whole_loss_extra_negatives_match_the_neighbour_formula():
    img, txt, other = unit(4, 8, seed=3), unit(4, 8, seed=4), unit(6, 8, seed=5)
    s, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    ours = whole_sigmoid_loss(img, txt, s, b, neg_text=other)
    # open_clip's negative-only term for another rank's texts
    want = whole_sigmoid_loss(img, txt, s, b) - F.logsigmoid(-(s * img @ other.T + b)).sum() / 4
    assert torch.allclose(ours, want, atol=1e-10)


def test_part_loss_equals_a_naive_loop():
    B, N, D = 3, 4, 8
    sub = unit(B, N, D, seed=6)
    grounded = unit(B, B, N, D, seed=7)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    total = 0.0
    for j in range(B):
        for i in range(B):
            for n in range(N):
                if not valid[i, n]:
                    continue
                logit = s * float(grounded[j, i, n] @ sub[i, n]) + b
                label = 1.0 if i == j else -1.0
                total += -math.log(1 / (1 + math.exp(-label * float(logit))))
    assert abs(part_sigmoid_loss(sub, grounded, valid, s, b).item() - total / B) < 1e-9


def test_losses_give_gradients_to_scale_and_bias():
    params = LogitParams()
    img = unit(4, 8, seed=8).float().requires_grad_()
    loss = whole_sigmoid_loss(img, unit(4, 8, seed=9).float(), params.scale(), params.bias)
    loss.backward()
    assert params.log_scale.grad is not None and params.bias.grad is not None and img.grad.abs().sum() > 0


def _bce(logit: float, label: float) -> float:
    return -math.log(1 / (1 + math.exp(-label * logit)))


def test_flair_losses_equal_a_naive_loop():
    """FLAIR loss.py: TCS over own K + one picked sub-caption of every other image, / (K + B - 1);
    MPS of the global image against every sub-caption, / (B * K). Image 3 is another rank's (negatives only)."""
    from model.losses import flair_mps_loss, flair_pick, flair_tcs_loss

    B, Ball, N, D = 3, 4, 4, 8
    sub = unit(Ball, N, D, seed=10)
    grounded = unit(B, Ball, N, D, seed=11)
    image = unit(B, D, seed=12)
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    s, b = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    pick = flair_pick(valid, B, torch.Generator().manual_seed(0))
    assert pick.shape == (B, Ball) and all(valid[j, pick[i, j]] for i in range(B) for j in range(Ball))
    tcs = 0.0
    for i in range(B):
        for j in range(Ball):
            for n in range(N):
                if (j == i and valid[j, n]) or (j != i and n == pick[i, j]):
                    tcs += _bce(float(s * (grounded[i, j, n] @ sub[j, n]) + b), 1.0 if j == i else -1.0)
    assert abs(flair_tcs_loss(sub, grounded, valid, pick, s, b).item() - tcs / (N + B - 1)) < 1e-9
    mps = 0.0
    for i in range(B):
        for j in range(Ball):
            for n in range(N):
                if valid[j, n]:
                    mps += _bce(float(s * (image[i] @ sub[j, n]) + b), 1.0 if j == i else -1.0)
    assert abs(flair_mps_loss(image, sub, valid, s, b).item() - mps / (B * N)) < 1e-9


def test_flair_pick_draws_every_valid_slot_of_the_other_images():
    from model.losses import flair_pick

    valid = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    picks = torch.stack([flair_pick(valid, 3, torch.Generator().manual_seed(k)) for k in range(200)])
    for j in range(3):
        assert set(picks[:, :, j].flatten().tolist()) == set(valid[j].nonzero().flatten().tolist())
