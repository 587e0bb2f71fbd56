"""Image-text scorers for region-sentence matching.

A scorer embeds image crops and sentences into one space; the score of a
(region, sentence) pair is the cosine similarity of their embeddings.
Backends register in SCORERS by the config's `regions.scorer.backend`
(a CAFT-checkpoint scorer plugs in here with the same two methods).
"""

from __future__ import annotations

import pickle
from typing import Protocol

import numpy as np

from .storage import unpickler_reason


class Scorer(Protocol):
    name: str

    def encode_images(self, images: list) -> np.ndarray:
        """PIL RGB images -> [N, D] float32, L2-normalised."""

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> [N, D] float32, L2-normalised."""


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class OpenClipScorer:
    """An open_clip model: a built-in name plus a pretrained tag, a checkpoint file (loaded without pickle), or none."""

    def __init__(self, cfg, device: str = "auto", seed: int = 0):
        import open_clip
        import torch

        self.device = resolve_device(device)
        try:
            with torch.random.fork_rng(devices=[]):  # random init (pretrained: None) is the same on every run
                torch.manual_seed(seed)
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    cfg.model, pretrained=cfg.pretrained, device=self.device, force_image_size=cfg.image_size,
                    weights_only=True)
        except RuntimeError as e:
            raise ValueError(f"regions.scorer: cannot build open_clip model {cfg.model!r} "
                             f"(pretrained={cfg.pretrained!r}): {e}") from None
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met something other than tensors
            raise ValueError(f"regions.scorer.pretrained: {cfg.pretrained} holds objects other than tensors; "
                             f"refused without unpickling them (give a safetensors file or a plain state_dict): "
                             f"{unpickler_reason(e)}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self.batch_size = cfg.batch_size
        self.name = f"open_clip:{cfg.model}:{cfg.pretrained or 'random'}"
        self._torch = torch

    def _run(self, fn, batches) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.inference_mode():
            for batch in batches:
                emb = fn(batch.to(self.device))
                out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def encode_images(self, images: list) -> np.ndarray:
        torch = self._torch
        chunks = (torch.stack([self.preprocess(im) for im in images[i:i + self.batch_size]])
                  for i in range(0, len(images), self.batch_size))
        return self._run(self.model.encode_image, chunks)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        chunks = (self.tokenizer(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size))
        return self._run(self.model.encode_text, chunks)


SCORERS = {"open_clip": OpenClipScorer}


def build_scorer(cfg, device: str = "auto", seed: int = 0) -> Scorer:
    """The configured scorer; `seed` fixes any random initialisation."""
    return SCORERS[cfg.backend](cfg, device, seed)
