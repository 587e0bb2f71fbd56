"""CONFIG.md is generated from the config models: it must be current, and it must name every key."""

from pathlib import Path

from pipeline.config import Config
from pipeline.configdoc import reference

ROOT = Path(__file__).resolve().parents[1]


def test_config_md_is_current():
    assert (ROOT / "CONFIG.md").read_text() == reference(), \
        "CONFIG.md is stale: run `longcap config --reference > CONFIG.md`"


def test_reference_lists_every_key_with_its_default_and_bounds():
    text = reference()
    for section in ("run", "ray", "input", "input.synthetic", "download", "captioners", "captioners.generation",
                    "prompts", "sentences", "sentences.quality", "export", "train", "regions",
                    "regions.detector", "regions.detector.train", "regions.scorer"):
        assert f"## `{section}`" in text, section
    for name in Config.model_fields["download"].annotation.model_fields:
        assert f"| `{name}` |" in text
    # a default, a bound and a description from the model, as written there
    assert "| `shard_size` | `int` >= 1, <= 1000000 | `1000` | input rows per shard |" in text
    assert "| `max_image_area` | `float` > 0 | `89478485` |" in text
