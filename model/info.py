"""`longcap model-info`: parameters and forward FLOPs per sample, next to open_clip's ViT-B-16.

FLOPs are counted by torch's FlopCounterMode (matmuls, convolutions, attention; 2 per multiply-add).
Superpixel clustering (SLIC's distance and mean updates) is elementwise work it does not count.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .caft import build
from .encoders import param_count


def count_flops(fn) -> int:
    # Grad on: in eval + no_grad, nn.TransformerEncoderLayer takes a fused fast path the counter cannot see;
    # the math attention kernel: the counter has no rule for CPU's fused attention.
    with FlopCounterMode(display=False) as counter, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def caft_info(name: str, n_sub: int = 8, k_chunks: int = 4, image_size: int = 224) -> dict:
    """One image and one caption of n_sub sub-captions (k_chunks of them in the whole caption)."""
    model = build(name).eval()
    if model.cfg.whole_depth == 0 and not model.cfg.part_loss:  # flat text, whole loss: one caption of 77 tokens
        n_sub, k_chunks = 1, 1
    images = torch.randn(1, 3, image_size, image_size)
    tokens = torch.randint(1, 49406, (1, n_sub, 77))
    tokens[..., -1] = 49407
    valid = torch.ones(1, n_sub, dtype=torch.bool)
    whole = torch.arange(n_sub).unsqueeze(0) < k_chunks
    v = {}
    image = count_flops(lambda: v.update(model.encode_image(images)))
    text = count_flops(lambda: v.update(t=model.encode_text(tokens, valid, whole)))
    pool = count_flops(lambda: model.ground(v["t"]["sub"], v["parts"])) if model.cfg.part_loss else 0
    return {"name": name, "params": param_count(model), "vision_params": param_count(model.vision),
            "text_params": param_count(model.text), "image_flops": image, "text_flops": text,
            "pool_flops": pool, "n_sub": n_sub}


def open_clip_info(arch: str = "ViT-B-16", image_size: int = 224) -> dict:
    import logging

    import open_clip

    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # open_clip logs its model building on the root logger
    try:
        model = open_clip.create_model(arch, pretrained=None).eval()
    finally:
        root.setLevel(level)
    images = torch.randn(1, 3, image_size, image_size)
    tokens = open_clip.tokenize(["a photo"])
    return {"name": f"open_clip {arch}", "params": param_count(model), "vision_params": param_count(model.visual),
            "text_params": param_count(model) - param_count(model.visual),
            "image_flops": count_flops(lambda: model.encode_image(images)),
            "text_flops": count_flops(lambda: model.encode_text(tokens)), "pool_flops": 0, "n_sub": 1}


def table(rows: list[dict]) -> str:
    head = f"{'model':<22}{'params':>9}{'vision':>9}{'text':>9}{'image GFLOPs':>14}{'text GFLOPs':>13}{'pool':>8}  texts"
    lines = [head]
    for r in rows:
        lines.append(f"{r['name']:<22}{r['params'] / 1e6:>8.1f}M{r['vision_params'] / 1e6:>8.1f}M"
                     f"{r['text_params'] / 1e6:>8.1f}M{r['image_flops'] / 1e9:>14.2f}{r['text_flops'] / 1e9:>13.2f}"
                     f"{r['pool_flops'] / 1e9:>8.3f}  {r['n_sub']}")
    return "\n".join(lines)
