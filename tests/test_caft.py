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


def test_ablation_rows_differ_in_the_named_part_only():
    from model.caft import CONFIGS, ablation_names

    rows = [CONFIGS[n] for n in ablation_names("tiny")]
    siglip, flair, visual, textual, hloss, no_part = rows
    assert (siglip.levels, siglip.whole_depth, siglip.part_loss) == ((), 0, False)
    assert flair.part_loss and not flair.levels and flair.whole_depth == 0
    assert visual.levels == hloss.levels and visual.whole_depth == 0 and not visual.part_loss
    assert textual.whole_depth > 0 and not textual.part_loss
    assert hloss.part_loss and hloss.part_level == 0 and no_part.part_level == -1
    images, tokens, valid, whole = batch(2)
    for cfg in rows:
        model = build(cfg.name)
        out = model(images, tokens, valid, whole)
        assert set(out) == ({"whole", "part", "loss"} if cfg.part_loss else {"whole", "loss"}), cfg.name
        parts = model.encode_image(images)["parts"]
        assert parts.shape[1] == (196 if cfg.part_level < 0 or not cfg.levels else cfg.levels[0]), cfg.name
    assert param_count(build("siglip-tiny").vision) != param_count(build("ablate-tiny-visual").vision)


def test_sfcn_backend_from_a_checkpoint(tmp_path):
    from model.sfcn import SFCN, save_sfcn

    path = tmp_path / "sfcn.safetensors"
    save_sfcn(SFCN().eval(), str(path))
    model = build("caft-tiny", backend="sfcn", sfcn_weights=str(path)).eval()
    images = batch(1)[0]
    v = model.encode_image(images)
    assert v["labels"].unique().numel() == 196  # an untrained SFCN labels the grid
    assert not any("sfcn" in k for k in model.state_dict())  # frozen tokenizer: not in the CAFT checkpoint
    with pytest.raises(ValueError, match="needs sfcn_weights"):
        build("caft-tiny", backend="sfcn")
    with pytest.raises(ValueError, match="unknown model config fields"):
        build("caft-tiny", depth=3)


def test_flop_counter_sees_linear_and_fused_transformer_layers():
    from torch import nn

    from model.info import caft_info, count_flops

    assert count_flops(lambda: nn.Linear(10, 20)(torch.randn(3, 10))) == 2 * 3 * 10 * 20
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(1, 5, 16)
    # q,k,v + out projections, two MLP layers, scores and weighted values
    expected = 2 * 5 * (4 * 16 * 16 + 2 * 16 * 32) + 2 * 2 * 5 * 5 * 16
    assert count_flops(lambda: layer(x)) == expected
    tiny = caft_info("caft-tiny", n_sub=4, k_chunks=2)
    assert tiny["params"] == param_count(build("caft-tiny")) and tiny["text_flops"] > 4 * 2 * 2 * 77 * 64 * 64 * 12


def test_gradient_checkpointing_gives_the_same_gradients():
    images, tokens, valid, whole = batch(2)
    grads, calls = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = build("caft-tiny")
        model.set_grad_checkpointing(on)
        count, blk = [0], model.vision.stages[0][0]
        forward = blk.forward

        def counted(*a, forward=forward, count=count, **k):
            count[0] += 1
            return forward(*a, **k)
        blk.forward = counted
        model(images, tokens, valid, whole)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(count[0])
    assert calls == [1, 2]  # checkpointed blocks run again in backward
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5) for n in grads[0])
    assert build("caft-tiny").vision.grad_checkpointing is False
