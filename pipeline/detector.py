"""The ultralytics YOLO detector: batched prediction, and a small detector trained on synthetic scenes.

ultralytics is kept offline (no update checks, no telemetry, no font download:
plots are off). Its `.pt` weights are pickles: load only files you trust
(the config names them; the demo trains its own).
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")
os.environ.setdefault("YOLO_AUTOINSTALL", "False")  # ultralytics would pip-install missing extras at run time

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from . import synthetic  # noqa: E402

CLASSES = list(synthetic.SHAPES)  # the synthetic detector's classes


def _yolo(weights: str):
    from ultralytics import YOLO

    _stay_offline()
    return YOLO(weights, task="detect")


def _stay_offline() -> None:
    """Two ultralytics habits that reach out or change global state, undone.

    Its dataset check fetches Arial.ttf for plots (plots are off here), and it patches PIL.Image.open so
    that an unknown file triggers a pi-heif install and raises ModuleNotFoundError instead of
    UnidentifiedImageError (which would turn one bad image into a failed shard)."""
    from PIL import Image
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import patches

    data_utils.check_font = lambda *args, **kwargs: None
    Image.open = getattr(patches, "_image_open", Image.open)


class Detector:
    """Loads weights once; `detect` takes PIL RGB images and returns their boxes."""

    def __init__(self, cfg, weights: str, device: str):
        try:
            self.model = _yolo(weights)
        except Exception as e:  # noqa: BLE001 - ultralytics raises many types for bad weights
            raise ValueError(f"regions.detector: cannot load weights {weights!r}: {type(e).__name__}: {e}") from None
        self.names = dict(self.model.names)
        by_name = {v: k for k, v in self.names.items()}
        unknown = [c for c in cfg.classes if c not in by_name]
        if unknown:
            raise ValueError(f"regions.detector.classes {unknown} are not classes of {weights!r}; "
                             f"it has: {', '.join(self.names.values())}")
        self.classes = [by_name[c] for c in cfg.classes] or None
        self.cfg, self.device = cfg, device

    def predict(self, arrays: list[np.ndarray]) -> list:
        """BGR uint8 arrays -> ultralytics Results, one per array."""
        c = self.cfg
        return self.model.predict(arrays, imgsz=c.imgsz, conf=c.conf, iou=c.iou, max_det=c.max_det,
                                  classes=self.classes, device=self.device, verbose=False, save=False)

    def detect(self, images: list) -> list[list[dict] | str]:
        """Per image: regions {box, source, score}, or an error message; batched, one by one after a failure."""
        out: list = []
        for i in range(0, len(images), self.cfg.batch):
            batch = [np.ascontiguousarray(np.asarray(im)[:, :, ::-1]) for im in images[i:i + self.cfg.batch]]
            try:
                results = self.predict(batch)
            except Exception:  # noqa: BLE001 - find the image that fails
                results = [self._one(a) for a in batch]
            out += [r if isinstance(r, str) else self._regions(r) for r in results]
        return out

    def _one(self, array):
        try:
            return self.predict([array])[0]
        except Exception as e:  # noqa: BLE001 - recorded per image
            return f"detector failed: {type(e).__name__}: {e}"

    def _regions(self, result) -> list[dict]:
        b = result.boxes
        boxes, conf, cls = b.xyxyn.cpu().numpy(), b.conf.cpu().numpy(), b.cls.cpu().numpy().astype(int)
        return [{"box": [float(v) for v in np.clip(box, 0, 1)], "source": f"det:{self.names[k]}", "score": float(s)}
                for box, s, k in zip(boxes, conf, cls)]


# ---------------------------------------------------------------- the synthetic detector


def write_detection_split(out: str | Path, n_train: int, n_val: int, image_size: int, seed: int) -> Path:
    """Synthetic scenes as a YOLO dataset (one class per shape); returns its data.yaml."""
    out = Path(out)
    rng = random.Random(f"{seed}:detection")
    for split, n in (("train", n_train), ("val", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            scene = synthetic.random_scene(rng)
            img, masks = synthetic.render(scene, image_size)
            img.save(out / "images" / split / f"{i:05d}.jpg", quality=92)
            lines = []
            for o, m in zip(scene.objects, masks):
                x0, y0, x1, y1 = synthetic.box_of(m)
                lines.append(f"{CLASSES.index(o.shape)} {(x0 + x1) / 2:.6f} {(y0 + y1) / 2:.6f} "
                             f"{x1 - x0:.6f} {y1 - y0:.6f}")
            (out / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + "\n")
    data = out / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(out.resolve()), "train": "images/train", "val": "images/val",
                                    "names": dict(enumerate(CLASSES))}))
    return data


def train_detector(models_dir: str | Path, cfg, device: str = "cpu") -> dict:
    """Train (or reuse) <models_dir>/detector/weights.pt; returns {'weights', 'map50', 'seconds', 'cached'}."""
    import json
    import time

    root = Path(models_dir) / "detector"
    weights, info_file = root / "weights.pt", root / "train.json"
    settings = cfg.model_dump(mode="json")
    if weights.exists() and info_file.exists():
        info = json.loads(info_file.read_text())
        if info.get("settings") == settings:
            return {**info, "weights": str(weights), "cached": True}
    t0 = time.time()
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    data = write_detection_split(work / "data", cfg.train_images, cfg.val_images, cfg.image_size, cfg.seed)
    model = _yolo(cfg.model)
    with warnings.catch_warnings():  # ultralytics' Ray Tune callback warns outside a Tune session
        warnings.simplefilter("ignore", UserWarning)
        # a small-data recipe: AdamW at a fixed rate, short warm-up, no mosaic for the last epochs
        model.train(data=str(data), epochs=cfg.epochs, imgsz=cfg.imgsz, batch=cfg.batch, device=device,
                    workers=0, amp=False, plots=False, val=True, seed=cfg.seed, deterministic=True,
                    project=str(work), name="train", exist_ok=True, verbose=False, optimizer="AdamW",
                    lr0=0.002, warmup_epochs=1, close_mosaic=min(3, cfg.epochs - 1))
    best = work / "train" / "weights" / "best.pt"
    map50 = detection_map50(str(best), data, cfg.imgsz, device)
    tmp = root / f"weights.pt.tmp-{os.getpid()}"
    shutil.copyfile(best, tmp)
    os.replace(tmp, weights)
    shutil.copytree(work / "data", root / "data", dirs_exist_ok=True)  # kept for eval-pairs
    (root / "data.yaml").write_text(data.read_text().replace(str((work / "data").resolve()), str((root / "data").resolve())))
    shutil.rmtree(work, ignore_errors=True)
    info = {"map50": map50, "seconds": round(time.time() - t0, 1), "settings": settings,
            "classes": CLASSES, "data": str(root / "data.yaml")}
    info_file.write_text(json.dumps(info, indent=2))
    return {**info, "weights": str(weights), "cached": False}


def detection_map50(weights: str, data: str | Path, imgsz: int, device: str = "cpu") -> float:
    """mAP at IoU 0.5 of `weights` on the val split of a YOLO dataset."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # ultralytics writes a run folder even without plots
        metrics = _yolo(weights).val(data=str(data), imgsz=imgsz, batch=16, device=device, plots=False,
                                     verbose=False, workers=0, split="val", project=tmp, name="val")
    return round(float(metrics.box.map50), 4)
