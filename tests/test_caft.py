import pytest
import torch
import torch.nn.functional as F

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


def _pooled_over(model, images, tokens, valid, whole):
    """forward() of a built model, recording how many image tokens the attention pooling gets as keys."""
    seen, forward = [], model.pool.forward

    def spy(queries, parts, *a, **k):
        seen.append(parts.shape[1])
        return forward(queries, parts, *a, **k)
    model.pool.forward = spy
    out = model(images, tokens, valid, whole)
    out["loss"].backward()
    return out, seen


def test_ablation_rows_use_the_papers_losses_and_image_tokens():
    """Table 3 rows on the built model: the loss terms, the image tokens the pooling attends to, whose
    gradients flow, the text encoder."""
    from model.caft import ablation_names, row_label
    from model.encoders import HierarchicalText, TextEncoder

    names = ablation_names("tiny")
    assert [row_label(n) for n in names] == ["FLAIR", "+ visual hierarchy", "+ textual hierarchy",
                                             "+ hierarchical loss (CAFT)", "- part-level alignment",
                                             "SigLIP (not in the paper)"]
    images, tokens, valid, whole = batch(2)
    # (loss terms, tokens the pooling attends to, text encoder, vision levels)
    want = {"flair-tiny": ({"tcs", "mps"}, 196, TextEncoder, ()),  # flat ViT: 14 x 14 patches
            "ablate-tiny-visual": ({"tcs", "mps"}, 16, TextEncoder, (64, 32, 16)),  # top-level segments
            "ablate-tiny-textual": ({"whole", "part"}, 16, HierarchicalText, (64, 32, 16)),  # both on the top
            "ablate-tiny-hloss": ({"whole", "part"}, 64, HierarchicalText, (64, 32, 16)),  # part on the mid level
            "ablate-tiny-no-part": ({"whole"}, None, HierarchicalText, (64, 32, 16)),
            "siglip-tiny": ({"whole"}, None, TextEncoder, ())}
    for name in names:
        torch.manual_seed(0)
        model = build(name)
        terms, keys, text_cls, levels = want[name]
        out, seen = _pooled_over(model, images, tokens, valid, whole)
        assert set(out) - {"loss"} == terms == set(model.losses_used()), name
        assert seen == ([keys] if keys else []), name
        assert type(model.text) is text_cls and model.cfg.levels == levels, name
        grad = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
        assert grad["vision.cls"] and grad["whole_logit.bias"], name
        assert grad["part_logit.bias"] == ("part" in terms), name  # FLAIR: one scale/bias pair for both losses
        assert grad["pool.attn.in_proj_weight"] == (keys is not None), name
        assert model.find_unused_parameters == (not all(grad.values())), name


def test_flair_row_loss_is_the_mean_of_its_two_flair_losses():
    from model.losses import flair_mps_loss, flair_tcs_loss

    images, tokens, valid, whole = batch(3)
    torch.manual_seed(1)
    model = build("ablate-tiny-visual")
    torch.manual_seed(5)
    out = model(images, tokens, valid, whole)
    v, t = model.encode_image(images), model.encode_text(tokens, valid, whole)
    sub = F.normalize(t["sub"], dim=-1)
    g = F.normalize(model.ground(t["sub"], v["parts"]), dim=-1)
    torch.manual_seed(5)  # the same draw of other images' sub-captions
    from model.losses import flair_pick
    pick = flair_pick(valid, 3)
    s, b = model.whole_logit.scale(), model.whole_logit.bias
    tcs = flair_tcs_loss(sub, g, valid, pick, s, b)
    mps = flair_mps_loss(F.normalize(v["cls"], dim=-1), sub, valid, s, b)
    assert torch.allclose(out["tcs"], tcs, atol=1e-5) and torch.allclose(out["mps"], mps, atol=1e-5)
    assert torch.allclose(out["loss"], (tcs + mps) / 2, atol=1e-5)


def test_part_tokens_are_the_second_stages_output():
    """CAFT §3.1: the part features are the 64 segment tokens as the second stage outputs them (after its
    blocks), not the pooled tokens that enter it; +textual takes the last stage's output."""
    model = build("caft-tiny").eval()
    images = batch(1)[0]
    got = {}
    model.vision.stages[1][-1].register_forward_hook(lambda m, i, o: got.__setitem__("stage2", o))
    model.vision.stages[-1][-1].register_forward_hook(lambda m, i, o: got.__setitem__("last", o))
    with torch.no_grad():
        v = model.encode_image(images)
        vis = model.vision
        want = vis.proj(vis.norm(got["stage2"][:, 1:]))
        before_blocks = vis.proj(vis.norm(v["levels"][0]))
    assert v["parts"].shape == (1, 64, 64) and torch.allclose(v["parts"], want, atol=1e-6)
    assert not torch.allclose(v["parts"], before_blocks, atol=1e-3)
    assert vis.part_assignments == 1  # heat maps: superpixels -> the 64 segments
    top = build("ablate-tiny-textual").eval()
    top.load_state_dict(model.state_dict())
    top.vision.stages[-1][-1].register_forward_hook(lambda m, i, o: got.__setitem__("last", o))
    with torch.no_grad():
        vt = top.encode_image(images)
        assert torch.allclose(vt["parts"], top.vision.proj(top.vision.norm(got["last"][:, 1:])), atol=1e-6)
    assert vt["parts"].shape == (1, 16, 64) and top.vision.part_assignments == 3
    with pytest.raises(ValueError, match="part_tokens"):
        build("caft-tiny", part_tokens="superpixels")
    with pytest.raises(ValueError, match="flat text encoder"):
        build("caft-tiny", loss="flair")


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
