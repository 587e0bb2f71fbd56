import pytest
import torch

from model.caft import build, describe
from model.data import tokenize
from model.encoders import param_count


def batch(b=2, n=4):
    torch.manual_seed(0)
    texts = ["A red cube on the left.", "A blue ball on the right.", "The floor is grey.", "A lamp."][:n]
    tokens = torch.stack([tokenize(texts) for _ in range(b)])
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, -1] = False
    whole = torch.zeros(b, n, dtype=torch.bool)
    whole[:, :2] = True
    return torch.randn(b, 3, 224, 224), tokens, valid, whole


def test_every_parameter_gets_a_gradient():
    model = build("caft-tiny")
    out = model(*batch())
    out["loss"].backward()
    assert set(out) == {"whole", "part", "loss"} and torch.isfinite(out["loss"])
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_caftpp_endpoints_are_whole_and_part():
    model = build("caft-tiny").eval()
    images, tokens, valid, whole = batch(3)
    v, t = model.encode_image(images), model.encode_text(tokens, valid, whole)
    s0, s1 = model.scores(v, t, valid, alpha=0.0), model.scores(v, t, valid, alpha=1.0)
    assert torch.allclose(s0["caftpp"], s0["whole"]) and torch.allclose(s1["caftpp"], s1["part"])
    mid = model.scores(v, t, valid, alpha=0.3)["caftpp"]
    assert torch.allclose(mid, 0.7 * s0["whole"] + 0.3 * s0["part"], atol=1e-6)
    assert s0["whole"].shape == (3, 3)


def test_grounding_heatmap_covers_the_image():
    model = build("caft-tiny").eval()
    images, tokens, valid, whole = batch(1)
    v, t = model.encode_image(images), model.encode_text(tokens, valid, whole)
    heat = model.heatmap(v, t["sub"][0])
    assert heat.shape == (4, 224, 224) and heat.min() >= 0 and heat.max() <= 1 + 1e-5


@pytest.mark.slow
def test_b16_forward_backward_on_cpu_and_size_class():
    import open_clip

    model = build("caft-b16")
    out = model(*batch(2, 4))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    ref = param_count(open_clip.create_model("ViT-B-16", pretrained=None))
    ours = describe(model)["params"]
    print(f"caft-b16 {ours / 1e6:.1f} M parameters; open_clip ViT-B-16 {ref / 1e6:.1f} M")
    assert 0.75 * ref <= ours <= 1.25 * ref
