"""SFCN-style superpixels: a small fully convolutional net predicts each pixel's soft association to the
9 grid cells around its own; trained without labels by the colour + position reconstruction loss.

Logits get a fixed prior (minus the squared distance to each cell centre, in cell units), so an
untrained net reproduces the grid; training moves boundaries onto colour edges. Checkpoints are
safetensors with `format=longcap-sfcn` metadata; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

from .superpixels import _neighbours, rgb_to_lab

log = logging.getLogger("longcap.sfcn")
FORMAT = "longcap-sfcn"


class SFCN(nn.Module):
    def __init__(self, grid: int = 14, width: int = 16):
        super().__init__()
        self.grid, self.width = grid, width

        def conv(i, o, s=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.LeakyReLU(0.1))

        self.c1 = nn.Sequential(conv(6, width), conv(width, width))
        self.c2 = nn.Sequential(conv(width, 2 * width, 2), conv(2 * width, 2 * width))
        self.c3 = nn.Sequential(conv(2 * width, 4 * width, 2), conv(4 * width, 4 * width))
        self.head = nn.Conv2d(7 * width, 9, 3, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [0,1] -> association logits [B,HW,9] (invalid neighbours at -inf)."""
        b, _, h, w = images.shape
        lab = rgb_to_lab(images.float())
        x = torch.cat([images.float(), lab / torch.tensor([100.0, 128.0, 128.0], device=images.device).view(1, 3, 1, 1)], 1)
        f1 = self.c1(x)
        f2 = self.c2(f1)
        f3 = self.c3(f2)
        up = lambda f: F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)  # noqa: E731
        out = self.head(torch.cat([f1, up(f2), up(f3)], 1)).flatten(2).transpose(1, 2)
        _, ok = _neighbours(h, w, self.grid, str(images.device))
        return (out + _prior(h, w, self.grid, images.device)).masked_fill(~ok, float("-inf"))

    def associations(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(-1)

    @torch.no_grad()
    def labels(self, images: torch.Tensor) -> torch.Tensor:
        """Hard superpixel ids [B,H,W] in [0, grid*grid)."""
        b, _, h, w = images.shape
        nb, _ = _neighbours(h, w, self.grid, str(images.device))
        pick = self.logits(images).argmax(-1)  # [B,HW]
        return torch.gather(nb.expand(b, -1, -1), 2, pick.unsqueeze(-1)).squeeze(-1).view(b, h, w)


def _prior(h: int, w: int, g: int, device) -> torch.Tensor:
    """-(distance to each of the 9 neighbouring cell centres)^2, in cell units: [HW,9]."""
    nb, _ = _neighbours(h, w, g, str(device))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * g / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * g / w
    py, px = torch.meshgrid(ys, xs, indexing="ij")
    cy, cx = (nb // g).float() + 0.5, (nb % g).float() + 0.5
    return -((py.flatten()[:, None] - cy) ** 2 + (px.flatten()[:, None] - cx) ** 2)


def reconstruction_loss(images: torch.Tensor, q: torch.Tensor, grid: int = 14, compactness: float = 0.1) -> dict:
    """SSN/SFCN loss: cell centres are association-weighted means of (Lab, position); every pixel is
    reconstructed from the centres of its 9 cells; colour error + compactness * position error."""
    b, _, h, w = images.shape
    n = grid * grid
    lab = rgb_to_lab(images.float()).flatten(2).transpose(1, 2) / 100.0  # [B,HW,3]
    ys, xs = torch.meshgrid(torch.arange(h, device=images.device, dtype=torch.float32),
                            torch.arange(w, device=images.device, dtype=torch.float32), indexing="ij")
    pos = torch.stack([ys.flatten() * grid / h, xs.flatten() * grid / w], 1).expand(b, -1, -1)  # cell units
    feats = torch.cat([lab, pos], -1)  # [B,HW,5]
    nb, _ = _neighbours(h, w, grid, str(images.device))
    ids = nb.flatten().expand(b, -1)  # [B,HW*9]
    qf = q.reshape(b, -1)
    mass = q.new_zeros(b, n).scatter_add_(1, ids, qf)
    sums = q.new_zeros(b, n, 5).scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, 5),
                                             (q.unsqueeze(-1) * feats.unsqueeze(2)).reshape(b, -1, 5))
    centres = sums / mass.clamp_min(1e-6).unsqueeze(-1)
    near = torch.gather(centres, 1, ids.unsqueeze(-1).expand(-1, -1, 5)).view(b, h * w, 9, 5)
    recon = (q.unsqueeze(-1) * near).sum(2)
    colour = ((recon[..., :3] - feats[..., :3]) ** 2).sum(-1).mean()
    position = ((recon[..., 3:] - feats[..., 3:]) ** 2).sum(-1).mean()
    return {"loss": colour + compactness * position, "colour": colour, "position": position}


def save_sfcn(model: SFCN, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "grid": str(model.grid), "width": str(model.width), "info": json.dumps(extra or {})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)


def load_sfcn(path: str, device: str = "cpu") -> SFCN:
    """An SFCN from a longcap safetensors checkpoint; anything else is refused with the reason."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device=device) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a longcap SFCN checkpoint (metadata format={meta.get('format')!r}, "
                                 f"expected {FORMAT!r}); train one with `longcap train-sfcn`")
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: cannot read as a safetensors SFCN checkpoint: {e}") from e
    model = SFCN(int(meta["grid"]), int(meta["width"])).to(device)
    model.load_state_dict(state)
    return model.eval()


def train_sfcn(images, steps: int = 500, batch: int = 8, size: int = 224, lr: float = 1e-3,
               compactness: float = 0.1, seed: int = 0, grid: int = 14, width: int = 16,
               device: str = "cpu", log_every: int = 50) -> tuple[SFCN, list[float]]:
    """Train on an iterable of PIL images (cycled; random square crops resized to `size`)."""
    from torchvision import transforms as T

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = list(images)
    if not pool:
        raise ValueError("train_sfcn: no images to train on")
    aug = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), T.RandomHorizontalFlip(), T.ToTensor()])
    model = SFCN(grid, width).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses, t0 = [], time.time()
    for step in range(steps):
        x = torch.stack([aug(rng.choice(pool)) for _ in range(batch)]).to(device)
        out = reconstruction_loss(x, model.associations(x), grid, compactness)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        if log_every and (step + 1) % log_every == 0:
            log.info("sfcn step %d/%d loss %.4f (colour %.4f, position %.4f) %.1fs", step + 1, steps,
                     losses[-1], out["colour"].item(), out["position"].item(), time.time() - t0)
    return model.eval(), losses
