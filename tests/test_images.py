"""The one image decode guard (pipeline/images.py): pixel limit, modes, sizes, named reasons; every caller uses it."""

import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import MAX_PIXELS, check_image, decode_image
from pipeline.records import download_reason

ROOT = Path(__file__).resolve().parents[1]


def encode(im, fmt="JPEG", **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_any_mode_to_rgb():
    gray = decode_image(encode(Image.new("L", (40, 30), 128)), 1e6, 1024, 16)
    assert gray.mode == "RGB" and gray.size == (40, 30) and gray.getpixel((5, 5)) == (128, 128, 128)
    cmyk = decode_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0))), 1e6, 1024, 16)
    r, g, b = cmyk.getpixel((5, 5))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # cyan 0, magenta + yellow full: red
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))
    assert decode_image(encode(rgba, "PNG")).getpixel((1, 1)) == (255, 255, 255)  # transparent: white
    deep = Image.fromarray(np.tile(np.arange(0, 65536, 2048, dtype=np.uint16), (32, 1)))
    dec = decode_image(encode(deep, "PNG"))
    assert dec.mode == "RGB" and dec.getpixel((0, 0))[0] == 0 and dec.getpixel((31, 0))[0] == 255
    pal = Image.new("P", (20, 20), 3)
    pal.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50] + [0] * 756)
    assert decode_image(encode(pal, "PNG")).getpixel((0, 0)) == (200, 100, 50)


def test_max_side_downscales_with_aspect_kept_and_no_max_side_keeps_the_size():
    im = decode_image(encode(Image.new("RGB", (400, 100), (10, 200, 30))), max_side=64)
    assert im.size == (64, 16) and im.mode == "RGB" and abs(im.getpixel((32, 8))[1] - 200) < 8
    big = encode(Image.new("RGB", (3000, 2000), (10, 200, 10)))
    assert decode_image(big, 1e8, 512, 16).size == (512, 341)
    assert decode_image(big).size == (3000, 2000)


def test_refusals_name_their_reason_and_map_to_a_short_reason():
    big = encode(Image.new("RGB", (3000, 2000), (10, 200, 10)))
    good = encode(Image.effect_noise((64, 64), 50).convert("RGB"))
    cases = {
        "too_large": (lambda: decode_image(big, 1e6), r"pixel limit: 3000x2000 = 6000000 pixels > 1000000"),
        "too_small": (lambda: decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), 1e6, 512, 16),
                      r"image too small: 1x1 px, at least 16 px per side needed"),
        "not_an_image": (lambda: decode_image(b"<html>nope</html>"), r"not an image: cannot identify image file"),
        "truncated": (lambda: decode_image(good[: len(good) // 2]), r"truncated image: "),
    }
    for reason, (fn, message) in cases.items():
        with pytest.raises(ValueError, match=message) as e:
            fn()
        assert download_reason("failed_to_download", str(e.value)) == reason
    assert decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), 1e6, 512, 1).size == (1, 1)
    assert check_image(big, 1e6).startswith("pixel limit: 3000x2000")
    assert check_image(good[: len(good) // 2]).startswith("truncated image")
    assert check_image(io.BytesIO(good)) is None


def test_every_caller_uses_the_one_guard():
    import model.data
    import model.evaluate
    import pipeline.download
    import pipeline.mllm
    import pipeline.regions
    import workflows.report

    assert model.data.decode_image is model.evaluate.decode_image is pipeline.mllm.decode_image is decode_image
    assert pipeline.regions.decode_image is decode_image and pipeline.download.check_image is check_image
    assert workflows.report.MAX_PIXELS == model.data.DataConfig().max_pixels == MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    # no second decoder or second copy of the limit anywhere in the package code
    files = subprocess.run(["git", "ls-files", "pipeline", "model", "workflows", "benchmarks"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert "pipeline/regions.py" in files
    for f in files:
        if f == "pipeline/images.py" or not f.endswith(".py"):
            continue
        text = (ROOT / f).read_text()
        assert not re.search(r"89_?478_?485", text), f"{f}: the pixel limit is pipeline.images.MAX_PIXELS"
        assert not re.search(r"^def (decode_image|check_image|to_rgb)\b", text, re.M), f"{f}: a second decoder"
