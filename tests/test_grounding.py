import torch

from model.grounding import grounding_mask, iou, otsu_threshold


def test_otsu_mask_of_a_two_level_map_is_exact():
    heat = torch.full((64, 64), 0.2)
    heat[10:30, 5:50] = 3.7  # foreground, any scale: min-max normalised first
    mask = grounding_mask(heat)
    want = torch.zeros(64, 64, dtype=torch.bool)
    want[10:30, 5:50] = True
    assert torch.equal(mask, want) and iou(mask, want) == 1.0


def test_otsu_separates_two_noisy_modes():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.2 + 0.03 * torch.randn(5000, generator=g), 0.8 + 0.03 * torch.randn(3000, generator=g)]).clamp(0, 1)
    t = otsu_threshold(x)
    assert 0.3 < t < 0.7  # anywhere in the empty gap separates the modes
    assert ((x >= t).sum().item()) == 3000


def test_flat_map_gives_an_empty_mask_not_an_error():
    assert not grounding_mask(torch.ones(8, 8)).any()
