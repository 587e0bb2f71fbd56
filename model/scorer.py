"""Trained models as image-text scorers (the regions stage's scorer interface), both L2-normalised numpy arrays:
a CAFT (image crops -> [CLS] embeddings, sentences, each one chunk -> whole-caption embeddings) and a FAST-GOAL
model (crops -> CLIP image embeddings, sentences alone -> CLIP text embeddings at EOT)."""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_model, model_file, read_train_json
from .data import image_transform, tokenize


class CaftScorer:
    def __init__(self, checkpoint: str, device: str = "cpu", image_size: int | None = None, batch_size: int = 64):
        self.model = load_model(checkpoint, device)
        self.device, self.batch_size = device, batch_size
        self.image_size = image_size or _trained_size(checkpoint) or 224
        self.name = f"caft:{self.model.cfg.name}:{checkpoint}@{self.model.trained_steps}"

    @torch.inference_mode()
    def encode_images(self, images: list) -> np.ndarray:
        tf = image_transform(self.image_size)
        out = [F.normalize(self.model.encode_image(torch.stack([tf(im.convert("RGB")) for im in images[i:i + self.batch_size]])
                                                   .to(self.device))["cls"].float(), dim=-1).cpu().numpy()
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.embed_dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = tokenize(texts[i:i + self.batch_size]).unsqueeze(1).to(self.device)  # each text one chunk
            ones = torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device)
            out.append(F.normalize(self.model.encode_text(tokens, ones, ones)["whole"].float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.cfg.embed_dim), np.float32)


def _trained_size(checkpoint: str) -> int | None:
    """The image size the model was trained at, from its training folder (train.json)."""
    try:  # a training folder (its latest checkpoint) or a step-* folder; a model file alone has no train.json
        return read_train_json(model_file(checkpoint).rsplit("/", 1)[0]).get("image_size")
    except (OSError, ValueError):
        return None


class GoalScorer:
    """A FAST-GOAL checkpoint (model/goal.py): crops through the CLIP image tower at the size it was trained at,
    each sentence alone as one row [SOT, BPE ids (at most 75), EOT], as its local loss encodes sentences."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 128):
        self.model = load_model(checkpoint, device)
        if getattr(self.model, "kind", None) != "goal":
            raise ValueError(f"{checkpoint}: not a FAST-GOAL model (kind {getattr(self.model, 'kind', 'caft')})")
        self.device, self.batch_size = device, batch_size
        self.image_size = self.model.input_size
        self.name = f"goal:{self.model.cfg.name}:{checkpoint}@{self.model.trained_steps}"

    @torch.inference_mode()
    def encode_images(self, images: list) -> np.ndarray:
        tf = image_transform(self.image_size)
        out = [F.normalize(self.model.encode_image(torch.stack([tf(im.convert("RGB"))
                                                                for im in images[i:i + self.batch_size]])
                                                   .to(self.device)).float(), dim=-1).cpu().numpy()
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.model.clip.visual.output_dim), np.float32)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        from .localdata import CHUNK_CONTEXT, EOT, SOT, bpe_ids, pad_rows

        out = []
        for i in range(0, len(texts), self.batch_size):
            rows = [[SOT] + bpe_ids(t)[:CHUNK_CONTEXT - 2] + [EOT] for t in texts[i:i + self.batch_size]]
            emb, _ = self.model.text_tokens(pad_rows(rows).to(self.device))
            out.append(F.normalize(emb.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.clip.visual.output_dim), np.float32)


def load_scorer(checkpoint: str, device: str = "cpu"):
    """A CaftScorer or a GoalScorer, by the checkpoint's model kind."""
    from .checkpoint import read_model_file

    _, meta = read_model_file(model_file(checkpoint))
    return GoalScorer(checkpoint, device) if meta.get("kind") == "goal" else CaftScorer(checkpoint, device)
