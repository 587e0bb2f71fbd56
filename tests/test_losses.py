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
