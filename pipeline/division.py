"""Spatial-division regions and region filters. Boxes are normalised xyxy (fractions of width and height)."""

from __future__ import annotations

import torch
from torchvision.ops import box_area, box_iou

GRIDS = {"whole": (1, 1), "halves": None, "quadrants": (2, 2), "3x3": (3, 3)}


def grid_boxes(cols: int, rows: int) -> list[list[float]]:
    """Cells of a cols x rows grid, row by row, left to right."""
    return [[c / cols, r / rows, (c + 1) / cols, (r + 1) / rows] for r in range(rows) for c in range(cols)]


def division_regions(schemes: list[str]) -> list[dict]:
    """Regions of the division schemes in order; halves = left, right, top, bottom."""
    out = []
    for scheme in schemes:
        if scheme not in GRIDS:
            raise ValueError(f"unknown division scheme {scheme!r}; schemes are {', '.join(GRIDS)}")
        boxes = grid_boxes(2, 1) + grid_boxes(1, 2) if scheme == "halves" else grid_boxes(*GRIDS[scheme])
        out += [{"box": b, "source": f"grid:{scheme}:{i}", "score": None} for i, b in enumerate(boxes)]
    return out


def area_filter(regions: list[dict], min_area: float, max_area: float) -> list[dict]:
    """Regions whose area fraction is within [min_area, max_area]."""
    if not regions:
        return []
    areas = box_area(torch.tensor([r["box"] for r in regions], dtype=torch.float64))
    return [r for r, a in zip(regions, areas.tolist()) if min_area <= a <= max_area]


def dedup(regions: list[dict], max_iou: float, keep_classes: bool = False) -> list[dict]:
    """Drop each region whose IoU with an earlier kept region is at least max_iou (earlier regions win).

    keep_classes: a detector box is dropped only by an earlier box of its own class (or a division box), so a
    box the detector also read as another class stays as that class's region (its other reading of the object)."""
    if len(regions) < 2:
        return list(regions)
    iou = box_iou(*(torch.tensor([r["box"] for r in regions], dtype=torch.float64),) * 2)
    kept: list[int] = []
    for i in range(len(regions)):
        rivals = kept
        if keep_classes and regions[i]["source"].startswith("det:"):
            rivals = [k for k in kept if regions[k]["source"] == regions[i]["source"]]
        if not rivals or iou[i, rivals].max() < max_iou:
            kept.append(i)
    return [regions[i] for i in kept]


def build_regions(detections: list[dict], schemes: list[str], min_area: float, max_area: float,
                  max_iou: float, keep_classes: bool = False) -> list[dict]:
    """Detector boxes (area-filtered, best score first), then division boxes; near-duplicates removed."""
    dets = sorted(area_filter(detections, min_area, max_area), key=lambda r: -r["score"])
    return dedup(dets + division_regions(schemes), max_iou, keep_classes)
