"""Weights files that carry a pickled payload (here: one that creates a marker file when unpickled) are refused
without running it wherever the library can load weights without pickle: the open_clip scorer and the hf
captioner. (longcap's own checkpoints are safetensors: tests/test_train.py. ultralytics `.pt` detector weights
are pickles by design: the README says so, and longcap loads only the file the config names.)"""

from pathlib import Path

import pytest
import torch

from pipeline.config import CaptionerSection, QualitySection, ScorerSection


class Evil:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_weights(path: Path, marker: Path, tensors: dict) -> Path:
    Evil.marker = marker
    torch.save({**tensors, "payload": Evil()}, path)
    return path


def test_open_clip_scorer_refuses_a_pickled_payload(tmp_path):
    from pipeline.scorers import build_scorer

    marker = tmp_path / "pwned"
    bad = evil_weights(tmp_path / "scorer.pt", marker, {"logit_scale": torch.ones(())})
    with pytest.raises(ValueError, match=r"scorer.pt holds objects other than tensors; refused without unpickling"):
        build_scorer(ScorerSection(model="ViT-S-32", pretrained=str(bad), image_size=64), "cpu")
    assert not marker.exists()


def test_hf_captioner_refuses_a_pickled_payload(tmp_path):
    from safetensors.torch import load_file

    from pipeline.captions import build_captioner
    from pipeline.tiny_vlm import build_tiny_vlm

    model = build_tiny_vlm(tmp_path / "vlm")
    weights = model / "model.safetensors"
    marker = tmp_path / "pwned"
    evil_weights(model / "pytorch_model.bin", marker, load_file(weights))  # the same weights, plus the payload
    weights.unlink()
    entry = CaptionerSection(name="hf", backend="hf", model=str(model), batch_size=2)
    with pytest.raises(ValueError, match=r"objects other than tensors; refused without unpickling them: "
                                         r"WeightsUnpickler error: Unsupported global"):
        build_captioner(entry, [], None, QualitySection())
    assert not marker.exists()
