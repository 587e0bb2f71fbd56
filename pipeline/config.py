"""Run configuration: pydantic models over YAML, with dotted CLI overrides.

One config fully describes a run. Everything is validated before any work
starts; errors name the key and, where it helps, the allowed values.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .images import MAX_PIXELS

STAGES = ("download", "dedup", "captions", "sentences", "regions", "export")
DEFAULT_STAGES = ("download", "captions", "sentences", "export")  # + dedup, regions when their sections are set


class ConfigError(ValueError):
    """A config that cannot be used; the message names every bad key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Strict):
    dir: str = Field(description="run directory: a local path or any fsspec URL")
    seed: int = 0
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="input rows per shard")
    stages: list[Literal[STAGES]] = list(DEFAULT_STAGES)  # type: ignore[valid-type]


class RaySection(Strict):
    address: Optional[str] = Field(None, description="None: start Ray locally; 'auto' or 'ray://host:10001': join a cluster")
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only")
    num_gpus: Optional[int] = Field(None, ge=0, description="local Ray only")
    runtime_env: Optional[dict[str, Any]] = None
    shard_retries: int = Field(2, ge=0, description="extra attempts for a shard whose task fails")
    download_tasks: Optional[int] = Field(None, ge=1, description="download shards in flight (default: CPUs)")
    captions_actors: int = Field(1, ge=1, description="captions actors (each loads every captioner's model once)")
    captions_runtime_env: Optional[dict[str, Any]] = Field(
        None, description="Ray runtime_env of the captions actors alone, e.g. {py_executable: /opt/vllm/bin/python}: "
        "the captioners run in another Python environment (another vLLM release) while the rest stays here")


class SyntheticSection(Strict):
    families: int = Field(12, ge=1)
    variants: int = Field(3, ge=1, le=8)
    image_size: int = Field(256, ge=96, le=2048)
    seed: int = 0
    broken: bool = Field(True, description="add a 404, a non-image and a truncated JPEG to the URL list")
    duplicates: bool = Field(False, description="add a second copy of the first URL and a re-encoded copy of an "
                             "image of synth/evalset/ (a held-out evaluation folder of its own families) to the URL list")


class InputSection(Strict):
    urls: list[str] = Field(default_factory=list, description="URL list files (parquet, csv, tsv, jsonl, txt)")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl", "txt"] = "auto"
    url_col: str = "url"
    caption_cols: list[str] = Field(default_factory=list, description="caption columns carried through")
    extra_cols: list[str] = Field(default_factory=list, description="other columns carried through")
    base_url: Optional[str] = Field(None, description="relative URLs are resolved against this")
    serve_dir: Optional[str] = Field(None, description="serve this folder on 127.0.0.1 during download; relative URLs point there")
    synthetic: Optional[SyntheticSection] = Field(None, description="generate the synthetic world in <run>/synth and serve it")
    images_from: Optional[str] = Field(None, description="an earlier run's directory: reuse its images/ (no download)")

    @field_validator("urls", "caption_cols", "extra_cols", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("images_from")
    @classmethod
    def _absolute(cls, v):  # Ray workers may start in another folder
        return os.path.abspath(v) if v and "://" not in v else v

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("urls", "synthetic", "images_from") if getattr(self, k)]
        if not given:
            raise ValueError("set input.urls (URL list files), input.synthetic or input.images_from (an earlier run)")
        if len(given) > 1:
            raise ValueError(f"input.{' and input.'.join(given)} are exclusive: pick one")
        return self


class DownloadSection(Strict):
    image_size: int = Field(384, ge=16)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    threads: int = Field(32, ge=1, le=1024, description="HTTP threads per shard")
    timeout: float = Field(10, gt=0, description="seconds per request, connecting to last byte")
    retries: int = Field(0, ge=0)
    min_image_size: int = Field(0, ge=0)
    max_image_area: float = Field(MAX_PIXELS, gt=0, description="pixel limit, checked from the header before decoding")
    max_aspect_ratio: float = Field(math.inf, gt=0)
    user_agent_token: Optional[str] = None
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"]
    )
    allow_networks: list[str] = Field(default_factory=list, description="networks fetched although loopback/"
                                      "private/link-local (e.g. 127.0.0.0/8 for a local server); metadata "
                                      "services and other special addresses are blocked unless listed")

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, v):
        import ipaddress
        for n in v:
            try:
                ipaddress.ip_network(n, strict=False)
            except ValueError as e:
                raise ValueError(f"{n!r} is not a network ({e}); write e.g. 127.0.0.0/8 or 10.1.2.3/32") from None
        return v


class PromptSection(Strict):
    text: str = Field(min_length=1, description="the instruction sent with the image")
    version: int = Field(1, ge=1, description="bump when the text changes; recorded with the text's hash")
    system: Optional[str] = Field(None, description="optional system message")


DEFAULT_PROMPTS = {
    "long": {"text": "Describe this image in detail. Write several complete sentences covering every visible "
                     "object, its colour, size, shape, texture and position, any text, and how the objects relate "
                     "to each other and to the background. Describe only what is visible.", "version": 1},
    "short": {"text": "Write one short sentence that describes the main content of this image.", "version": 1},
}


class GenerationSection(Strict):
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0, le=5, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, description="None: run.seed; either way a seed per key is derived from it")


BACKEND_KEYS = {  # keys that only some backends read
    "columns": {"source"},
    "model": {"hf", "openai", "vllm"}, "prompts": {"hf", "openai", "vllm"}, "generation": {"hf", "openai", "vllm"},
    "image_max_side": {"hf", "openai", "vllm"}, "batch_size": {"hf"}, "device": {"hf"}, "dtype": {"hf", "vllm"},
    "base_url": {"openai"}, "api_key_env": {"openai"}, "max_in_flight": {"openai"}, "timeout": {"openai"},
    "retries": {"openai"}, "backoff": {"openai"}, "backoff_max": {"openai"}, "extra_body": {"openai"},
    "tensor_parallel_size": {"vllm"}, "engine_args": {"vllm"},
}


class CaptionerSection(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backend: Literal["source", "hf", "openai", "vllm"]
    columns: list[str] = Field(default_factory=list, description="source: input caption columns (default: all of input.caption_cols)")
    model: Optional[str] = Field(None, description="hf/vllm: model path or hub id; openai: the server's model name")
    prompts: list[str] = Field(default_factory=lambda: ["long"], description="prompt ids (keys of `prompts`); one row each")
    generation: GenerationSection = Field(default_factory=GenerationSection)
    image_max_side: int = Field(768, ge=16, description="images are resized to fit this before captioning")
    gpus: float = Field(0, ge=0, description="GPUs the captions actor reserves for this captioner (vllm: default tensor_parallel_size)")
    batch_size: int = Field(8, ge=1, description="hf: images per generate call")
    device: str = Field("cpu", description="hf: 'cpu', 'cuda', 'cuda:1', 'auto'")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    base_url: Optional[str] = Field(None, description="openai: server root, e.g. http://127.0.0.1:8000/v1")
    api_key_env: Optional[str] = Field(None, description="openai: name of the environment variable holding the API key")
    max_in_flight: int = Field(16, ge=1, le=4096, description="openai: requests in flight at once")
    timeout: float = Field(120, gt=0, description="openai: seconds per request")
    retries: int = Field(6, ge=0, description="openai: extra attempts on 429/5xx/timeouts/connection errors")
    backoff: float = Field(0.5, ge=0, description="openai: first retry delay in seconds, doubled each attempt")
    backoff_max: float = Field(30, ge=0, description="openai: longest retry delay")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="openai: extra fields of every request")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vllm.LLM arguments")

    @field_validator("columns", "prompts", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _backend_keys(self):
        fields = type(self).model_fields  # a dumped config sets every key: compare with the defaults
        wrong = sorted(k for k in self.model_fields_set if k in BACKEND_KEYS and self.backend not in BACKEND_KEYS[k]
                       and getattr(self, k) != fields[k].get_default(call_default_factory=True))
        if wrong:
            uses = "; ".join(f"{k}: {'/'.join(sorted(BACKEND_KEYS[k]))}" for k in wrong)
            raise ValueError(f"captioner {self.name!r} (backend {self.backend}) does not use {wrong} ({uses})")
        if self.backend != "source" and not self.model:
            raise ValueError(f"captioner {self.name!r}: backend {self.backend} needs `model`")
        if self.backend == "openai" and not self.base_url:
            raise ValueError(f"captioner {self.name!r}: backend openai needs `base_url` (e.g. http://127.0.0.1:8000/v1)")
        if self.backend != "source" and len(set(self.prompts)) != len(self.prompts):
            raise ValueError(f"captioner {self.name!r}: prompts listed twice in {self.prompts}")
        if self.backend == "vllm" and "gpus" not in self.model_fields_set:
            self.__dict__["gpus"] = float(self.tensor_parallel_size)
        return self


Action = Literal["keep", "strip", "exclude"]


class QualitySection(Strict):
    min_words: int = Field(5, ge=0, description="fewer words: too_few_words")
    max_words: int = Field(1000, ge=1, description="more words: too_long")
    repetition_n: int = Field(4, ge=1, description="n of the word n-grams for the repetition ratio")
    max_repetition: float = Field(0.35, ge=0, le=1, description="higher 1 - distinct/total n-grams: repetition")
    min_alpha: float = Field(0.5, ge=0, le=1, description="lower letters / non-space characters: non_alpha")
    openings: list[str] = Field(default_factory=list, description="regexes of boilerplate openings (default: built in)")
    actions: dict[str, Action] = Field(default_factory=dict, description="flag -> keep | strip | exclude")

    @field_validator("actions")
    @classmethod
    def _known_actions(cls, v):
        from .quality import FLAGS, STRIPPABLE

        for flag, action in v.items():
            if flag not in FLAGS:
                raise ValueError(f"unknown flag {flag!r}; flags are {', '.join(FLAGS)}")
            if action == "strip" and flag not in STRIPPABLE:
                raise ValueError(f"{flag!r} cannot be stripped (only {', '.join(sorted(STRIPPABLE))}); use keep or exclude")
        return v

    @field_validator("openings")
    @classmethod
    def _valid_regex(cls, v):
        import re

        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"opening {pattern!r} is not a valid regex: {e}") from None
        return v


class SentencesSection(Strict):
    spacy_model: str = Field("blank:en", description="'blank:en' (tokenizer only) or an installed pipeline name")
    segmenter: Literal["rules", "sentencizer", "pysbd", "nupunkt", "pipeline"] = Field(
        "rules", description="sentence splitter (a spaCy component): rules (longcap's, pipeline/segmenters.py), "
        "sentencizer (spaCy's), pysbd or nupunkt (installed separately), pipeline (spacy_model's parser/senter)")
    batch_size: int = Field(256, ge=1)
    quality: QualitySection = Field(default_factory=QualitySection)


class ExportSection(Strict):
    min_sentences: int = Field(1, ge=0, description="captions with fewer sentences are left out of a sample")
    min_image_size: int = Field(0, ge=0, description="original short side below this: key not exported")
    max_samples: int = Field(10_000, ge=1, description="samples per export tar")
    max_bytes: int = Field(1_000_000_000, ge=1_000_000, description="bytes per export tar (approximate)")
    caption_repeats: int = Field(3, ge=2, description="a caption text on at least this many exported images is "
                                 "flagged (export/repeated_captions.json, status): a captioner's boilerplate")
    txt: Optional[str] = Field(None, description="the caption written in full as <key>.txt (what open_clip's trainer "
                               "reads): 'CAPTIONER/PROMPT' (source: 'CAPTIONER/COLUMN'); default the first "
                               "captioner's first prompt (the long one by default)")


EVALSET_KINDS = ("folder", "dci", "docci", "urban-1k", "sharegpt4v-1k", "sharegpt4v-10k", "iiw", "coco-5k",
                 "flickr30k-1k", "refcoco", "refcoco+", "refcocog")  # model/evalsets.py's readers (a test checks)


class EvalSetRef(Strict):
    name: str = Field(description="the set's name in the reason 'contaminated: <name>' and in status")
    path: str = Field(description="a local copy in its published layout, or a folder of images; a relative path "
                      "is inside the run directory")
    kind: Literal[EVALSET_KINDS] = Field("folder", description="a reader of model/evalsets.py, or 'folder' (every "  # type: ignore[valid-type]
                                         "image file under path)")
    split: Optional[str] = Field(None, description="the reader's split (default: the reader's; refer sets: val)")


class DedupSection(Strict):
    """Duplicates and evaluation-set contamination (stage 'dedup', pipeline/dedup_stage.py); thresholds measured in
    benchmarks/BENCHMARKS.md (near-duplicate detection)."""
    url: bool = Field(True, description="the same normalised URL is a duplicate")
    bytes: bool = Field(True, description="the same image bytes (img2dataset's sha256) are a duplicate")
    near: bool = Field(True, description="near duplicates: pHash candidates (whole image, mirror, crop windows) "
                       "verified on aligned colour thumbnails")
    max_distance: int = Field(8, ge=0, le=32, description="pHash bits (of 64) for a near-duplicate candidate")
    max_mean: float = Field(12.0, ge=0, description="verification: at most this mean RGB distance (0..441) of the aligned thumbnails")
    max_local: float = Field(46.0, ge=0, description="... and at most this RMS RGB distance in the worst window (after the blur)")
    max_ratio: float = Field(50.0, ge=0, description="... and the worst window's mean squared distance at most this many times "
                             "the image's (+ ratio_floor): one changed detail in an otherwise equal image is not a duplicate")
    ratio_floor: float = Field(4.0, gt=0, description="squared RGB distance added to the image's mean in that ratio")
    blur: float = Field(1.0, gt=0, description="Gaussian sigma (thumbnail px) before the window statistics")
    window: int = Field(13, ge=3, le=64, description="window side (thumbnail px)")
    thumb: int = Field(256, ge=16, le=512, description="compared at min(thumb, the smaller image's shorter side) px a side (half that side for a copy at another scale)")
    verify_chunk: int = Field(256, ge=1, description="candidate pairs per verification task (the unit of resume)")
    before_captions: bool = Field(False, description="captions wait for the dedup pass and skip duplicate and "
                                  "contaminated images (their rows: skipped, with the reason); saves captioner time, "
                                  "but captioning starts only once every shard is downloaded and the global pass is done")
    evalsets: list[EvalSetRef] = Field(default_factory=list, description="evaluation sets: a training image that "
                                       "is a near duplicate of one of their images is excluded as 'contaminated: <name>'")

    @field_validator("evalsets")
    @classmethod
    def _unique_names(cls, v):
        names = [e.name for e in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate evaluation set names {dupes}")
        return v


class TrainSection(Strict):
    """Training (model/train.py). In a run config, `longcap run` trains after export; `longcap train` takes
    a file with this section alone or a run config."""
    model: str = Field("caft-tiny", description="a config name from model/registry.py: CAFT and baselines (model/caft.py), "
                       "goal-* (model/goal.py), grouping-* (model/grouping.py)")
    model_changes: dict[str, Any] = Field(default_factory=dict, description="model config fields to change, e.g. "
                                          "backend: sfcn (CAFT), pretrained: /path/clip.pt (GOAL)")
    shards: list[str] = Field(default_factory=list, description="export tars: paths, globs, {a..b} braces, fsspec URLs; "
                              "empty in a run: the run's export/")
    eval_shards: list[str] = Field(default_factory=list, description="held-out tars; empty in a run: the run's export/")
    train_where: dict[str, Any] = Field(default_factory=dict, description="keep samples whose json extra matches, "
                                        "e.g. {split: train}")
    eval_where: dict[str, Any] = Field(default_factory=dict)
    eval_phrases: Optional[str] = Field(None, description="grouping models: a local Flickr30K Entities copy "
                                        "(Sentences/*.txt) to measure phrase tIoU/F1 on")
    out: Optional[str] = Field(None, description="checkpoint folder; default <run>/models/<model>")
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="global batch (all processes, all accumulation steps)")
    accum: int = Field(1, ge=1, description="gradient accumulation steps (negatives come from one micro-batch)")
    sampling: Literal["epoch", "resampled"] = Field("epoch", description="epoch: each data epoch reads every shard "
                                                    "once, split across processes and workers (a global drop_last); "
                                                    "resampled: shards drawn with replacement per process")
    epoch_samples: Optional[int] = Field(None, ge=1, description="sampling resampled: samples per data epoch per "
                                         "process; default: the index's row count / processes")
    record_keys: bool = Field(False, description="each process writes the sample keys of every micro-batch to "
                              "<out>/keys-rank<R>.jsonl (to audit what was trained on)")
    lr: float = Field(5e-4, gt=0)
    min_lr: float = Field(0.0, ge=0, description="fraction of lr at the end of the cosine")
    warmup: int = Field(100, ge=0)
    weight_decay: float = Field(0.2, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="0: off")
    grad_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    n_sub: int = Field(8, ge=1)
    k_chunks: int = Field(4, ge=1)
    image_size: int = Field(224, ge=32)
    workers: int = Field(2, ge=0, description="DataLoader workers per process")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate at the end only")
    ckpt_every: int = Field(100, ge=1)
    keep: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = 0
    processes: int = Field(1, ge=1, description="local processes (DDP, gloo on CPU, NCCL on GPU)")
    ray_workers: int = Field(0, ge=0, description=">0: train through Ray Train's TorchTrainer with this many workers")
    gpus_per_worker: float = Field(0, ge=0)
    threads: Optional[int] = Field(None, ge=1, description="torch threads per process")
    tensorboard: bool = True

    @field_validator("model")
    @classmethod
    def _known_model(cls, v):
        from model.registry import all_configs  # the registry is the one list of names

        names = list(all_configs())
        if v not in names:
            close = difflib.get_close_matches(v, names, n=1)
            raise ValueError(f"unknown model {v!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; known: {', '.join(names)}")
        return v

    @field_validator("model_changes")
    @classmethod
    def _known_fields(cls, v, info):
        if v and "model" in info.data:  # (a bad model name is reported on its own)
            from model.registry import check_changes

            check_changes(info.data["model"], v)
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.k_chunks > self.n_sub:
            raise ValueError(f"k_chunks ({self.k_chunks}) must not exceed n_sub ({self.n_sub})")
        return self


class DetectorTrainSection(Strict):
    """Train a small YOLO from a model yaml (random init) on synthetic scenes; cached in <run>/models/detector."""
    model: str = Field("yolo11n.yaml", description="ultralytics model yaml (random init)")
    train_images: int = Field(240, ge=4)
    val_images: int = Field(60, ge=2)
    image_size: int = Field(256, ge=64, le=2048, description="size of the rendered synthetic scenes")
    imgsz: int = Field(192, ge=32, le=2048, description="YOLO input size in training and validation")
    epochs: int = Field(18, ge=1)
    batch: int = Field(16, ge=1)
    seed: int = 0


class DetectorSection(Strict):
    weights: Optional[str] = Field(None, description="ultralytics weights: a path or a name (.pt files are pickles: only trusted ones)")
    train: Optional[DetectorTrainSection] = Field(None, description="train a detector on the synthetic world instead")
    classes: list[str] = Field(default_factory=list, description="keep only these class names (default: all)")
    conf: float = Field(0.25, ge=0, le=1)
    iou: float = Field(0.7, ge=0, le=1, description="NMS IoU threshold")
    imgsz: int = Field(640, ge=32)
    max_det: int = Field(50, ge=1)
    batch: int = Field(16, ge=1, description="images per predict call")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.weights is None) == (self.train is None):
            raise ValueError("set exactly one of regions.detector.weights and regions.detector.train")
        return self


class ScorerSection(Strict):
    backend: Literal["open_clip"] = "open_clip"
    model: str = Field("ViT-B-32", description="open_clip model name")
    pretrained: Optional[str] = Field(None, description="open_clip pretrained tag or checkpoint file; None: random init")
    image_size: Optional[int] = Field(None, ge=16, description="force the vision tower's input size")
    batch_size: int = Field(64, ge=1)


Division = Literal["whole", "halves", "quadrants", "3x3"]


class RegionsSection(Strict):
    detector: Optional[DetectorSection] = Field(None, description="None: spatial division only")
    division: list[Division] = Field(default_factory=lambda: ["whole", "halves", "quadrants"])
    min_area: float = Field(0.01, ge=0, le=1, description="detector boxes below this image fraction are dropped")
    max_area: float = Field(0.8, ge=0, le=1, description="detector boxes above this image fraction are dropped")
    dedup_iou: float = Field(0.9, gt=0, le=1, description="a region this close to an earlier one is dropped")
    scorer: ScorerSection = Field(default_factory=ScorerSection)
    threshold: float = Field(0.2, description="a sentence's best region is kept at or above this score")
    margin: float = Field(0.0, ge=0, description="... and when it beats the runner-up by more than this")
    top_k: int = Field(3, ge=1, description="scores kept per sentence for analysis")
    max_side: int = Field(1024, ge=16, description="larger images are downscaled before detection and cropping")
    min_side: int = Field(16, ge=1, description="smaller images get status failed")
    goal_json: bool = Field(False, description="also write regions/<shard>.goal.json (GOAL's format)")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'")
    num_gpus: float = Field(0, ge=0, description="GPUs per regions actor")
    kinds_spacy_model: str = Field("blank:en", description="spaCy pipeline for sentence kinds ('blank:en': token rules; one with a parser: noun chunks)")
    pair_object: Literal["best", "none"] = Field("best", description="object sentences: the best region")
    pair_relation: Literal["union", "best", "none"] = Field("union", description="relation sentences: the union box of their two objects' best regions")
    pair_scene: Literal["whole", "best", "none"] = Field("whole", description="scene/background sentences: the whole image")
    pair_other: Literal["best", "none"] = Field("best", description="other sentences")
    object_regions: Literal["detector", "all"] = Field("detector", description="the regions an object sentence "
                                                       "chooses from: detector boxes (division boxes only when the "
                                                       "image has none), or every region")
    relation_regions: Literal["detector", "all"] = Field("detector", description="the regions each object of a "
                                                         "relation sentence chooses from: detector boxes (every region "
                                                         "when the image has fewer than two), or every region")
    labels: Optional[bool] = Field(None, description="label-aware scores; None: on when the detector's class names are words")
    label_weight: float = Field(1.0, ge=0, description="added to a region's score when its class names the sentence's main object (half for its other objects); times the detector's confidence with label_scale: confidence")
    synonyms: dict[str, list[str]] = Field(default_factory=dict, description="more words per detector class (extends the built-in list)")
    relation_max_iou: float = Field(0.5, gt=0, le=1, description="a relation's two objects are two regions that "
                                    "overlap by less than this IoU (two readings of one object are not two objects)")
    object_assignment: Literal["independent", "one_to_one"] = Field("independent", description="object sentences "
                                                                    "of one caption: each its best region, or "
                                                                    "distinct regions chosen jointly (highest total)")
    object_text: Literal["sentence", "phrase", "mean"] = Field("mean", description="what an object sentence's "
                                                              "regions are scored against: the sentence, its main noun "
                                                              "phrase ('a small purple hexagon': what a crop shows, "
                                                              "without 'sits in the top left'), or the mean of both")
    label_scale: Literal["flat", "confidence"] = Field("confidence", description="the label term of a detector box: "
                                                       "label_weight as it is (flat), or times the box's detector "
                                                       "confidence")
    class_alternatives: bool = Field(True, description="a detector box that nearly equals (dedup_iou) a box of "
                                     "another class is kept: the detector's other reading of the same object, which "
                                     "the label term can pick; false: the more confident box only")

    @model_validator(mode="after")
    def _areas(self):
        if self.min_area >= self.max_area:
            raise ValueError(f"regions.min_area {self.min_area} must be below max_area {self.max_area}")
        return self


class SelfTrainSection(Strict):
    """`longcap selftrain`: a scorer trained on the run's own captions (workflows/selftrain.py). Round 0 trains a
    global-only FAST-GOAL model on the exported captions and rescores the run's regions with it; each later round
    trains FAST-GOAL with the previous round's local pairs (initialised from the previous round's model), rescores
    and pairs again. Each round's pairs go to selftrain/round-N/ and its precision/recall (synthetic runs) to
    selftrain/rounds.json; a rerun skips the rounds recorded with the same settings."""
    rounds: int = Field(1, ge=0, description="self-training rounds after the global round 0")
    global_model: str = Field("goal-tiny-global", description="round 0: a goal-* config (global-only: no local pairs)")
    local_model: str = Field("goal-tiny", description="rounds 1..: a goal-* config that trains on local pairs")
    model_changes: dict[str, Any] = Field(default_factory=lambda: {"long_text": "chunk"},
                                          description="GOAL config fields for both models; chunk keeps CLIP's 77 text "
                                          "positions, so a round's weights load into the next round's model as they are")
    steps: int = Field(300, ge=1, description="training steps of round 0")
    local_steps: Optional[int] = Field(None, ge=1, description="training steps of each later round; None: steps")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(30, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    image_size: int = Field(64, ge=32, description="the models' input size (model_changes.image_size follows it)")
    workers: int = Field(1, ge=0, description="DataLoader workers")
    threads: Optional[int] = Field(None, ge=1, description="torch threads")
    seed: int = 0
    train_where: dict[str, Any] = Field(default_factory=dict, description="keep exported samples whose json extra "
                                        "matches; empty: every exported image of the run (its own captions)")
    regions: dict[str, Any] = Field(default_factory=dict, description="regions keys changed for the rescoring "
                                    "(threshold, margin, label_weight, ...); empty: the run's regions section")
    device: str = Field("auto", description="auto: cuda when available")

    @field_validator("global_model", "local_model")
    @classmethod
    def _goal_model(cls, v):
        from model.registry import all_configs

        found = all_configs().get(v)
        if found is None or found[0] != "goal":
            names = [n for n, (k, _) in all_configs().items() if k == "goal"]
            raise ValueError(f"{v!r} is not a goal model; goal models: {', '.join(names)}")
        return v

    @field_validator("regions")
    @classmethod
    def _regions_keys(cls, v):
        unknown = [k for k in v if k not in RegionsSection.model_fields]
        if unknown:
            raise ValueError(f"unknown regions keys {unknown}")
        return v


class Config(Strict):
    run: RunSection
    ray: RaySection = Field(default_factory=RaySection)
    input: InputSection
    download: DownloadSection = Field(default_factory=DownloadSection)
    captioners: list[CaptionerSection] = Field(default_factory=lambda: [CaptionerSection(name="source", backend="source")])
    prompts: dict[str, PromptSection] = Field(default_factory=dict, validate_default=True,
                                             description="named prompts (built in: long, short)")
    sentences: SentencesSection = Field(default_factory=SentencesSection)
    export: ExportSection = Field(default_factory=ExportSection)
    train: Optional[TrainSection] = Field(None, description="train after export (longcap run) when set")
    regions: Optional[RegionsSection] = Field(None, description="regions and local pairs (stage 'regions')")
    dedup: Optional[DedupSection] = Field(None, description="duplicates and contamination (stage 'dedup'); export "
                                          "then leaves duplicates and contaminated keys out")
    selftrain: Optional[SelfTrainSection] = Field(None, description="`longcap selftrain`: train the pair scorer on "
                                                  "the run's own captions (None: the command's defaults)")

    @field_validator("prompts", mode="before")
    @classmethod
    def _default_prompts(cls, v):
        return {**DEFAULT_PROMPTS, **(v or {})}

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.input.synthetic is not None or self.input.serve_dir:
            import ipaddress
            if not any(ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(n, strict=False)
                       for n in self.download.allow_networks):
                raise ValueError("input.synthetic / input.serve_dir serve images from 127.0.0.1, which is blocked "
                                 "by default: opt in with download.allow_networks: [127.0.0.1/32]")
        explicit = "stages" in self.run.model_fields_set  # (an assignment below adds it)
        if self.regions is not None and not explicit and "regions" not in self.run.stages:
            self.run.stages = [s for s in STAGES if s in self.run.stages or s == "regions"]
        if self.regions is None and "regions" in self.run.stages:
            raise ValueError("run.stages has 'regions' but there is no regions section")
        if self.dedup is not None and not explicit and "dedup" not in self.run.stages:
            self.run.stages = [s for s in STAGES if s in self.run.stages or s == "dedup"]
        if self.dedup is None and "dedup" in self.run.stages:
            raise ValueError("run.stages has 'dedup' but there is no dedup section")
        names = [c.name for c in self.captioners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"captioners: duplicate names {dupes}")
        for c in self.captioners:
            unknown = [p for p in c.prompts if p not in self.prompts] if c.backend != "source" else []
            if unknown:
                raise ValueError(f"captioners[{c.name}].prompts {unknown} are not defined; prompts are {sorted(self.prompts)}")
            missing = [col for col in c.columns if col not in self.input.caption_cols]
            if c.backend == "source" and missing and self.input.synthetic is None:
                raise ValueError(
                    f"captioners[{c.name}].columns {missing} are not in input.caption_cols {self.input.caption_cols}"
                )
        if self.export.txt is not None and self.export.txt not in self.caption_names():
            raise ValueError(f"export.txt {self.export.txt!r} is not a caption of this run; "
                             f"captions are {', '.join(self.caption_names())}")
        return self

    def caption_names(self) -> list[str]:
        """'CAPTIONER/PROMPT' of every caption the run makes, in config order (source: one per column)."""
        return [f"{c.name}/{p}" for c in self.captioners
                for p in (c.prompts if c.backend != "source" else c.columns or self.caption_columns())]

    def txt_caption(self) -> str | None:
        """The caption export writes as <key>.txt: export.txt, else the first captioner's first prompt."""
        names = self.caption_names()
        return self.export.txt or (names[0] if names else None)

    def caption_columns(self) -> list[str]:
        """Input caption columns (the synthetic world has one: 'caption')."""
        return ["caption"] if self.input.synthetic is not None else list(self.input.caption_cols)

    def extra_columns(self) -> list[str]:
        return ["id", "family", "variant", "split"] if self.input.synthetic is not None else list(self.input.extra_cols)


# ---------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'download.timeout=5' -> (['download', 'timeout'], 5); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, _, raw = text.partition("=")
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_override(data: dict, parts: list[str], value: Any) -> None:
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {where} is not a section")
        nxt = node.get(part)
        if nxt is None:
            if parts[i + 1].isdigit():
                raise ConfigError(f"override {'.'.join(parts)}: {where} is not set, so it has no item {parts[i + 1]}")
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(parts))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {'.'.join(parts)}: parent is not a section")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {where}: index {part!r} out of range (list has {len(node)} items)")
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> Config:
    """Read YAML (or take `data`), apply overrides, validate, check files exist."""
    if data is None:
        data = _read_yaml(str(path))
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path or "config"))) from None
    check_files(cfg)
    return cfg


class _TrainFile(Strict):
    train: TrainSection


def load_train_config(path: str, overrides: list[str] = ()) -> tuple[TrainSection, Optional[str]]:
    """`longcap train` input: a run config with a `train:` section (-> its run dir), or a file that is only
    the train section (its keys at the top level; overrides then name them without `train.`)."""
    data = _read_yaml(str(path))
    if "run" in data:
        cfg = load_config(path, overrides, data=data)
        if cfg.train is None:
            raise ConfigError(f"{path}: has no train section")
        return cfg.train, cfg.run.dir
    for o in overrides:
        apply_override(data, *parse_override(o))
    try:
        return _TrainFile.model_validate({"train": data}).train, None
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source=str(path))) from None


def _read_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(_read_text(path)) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _read_text(path: str) -> str:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read ({e})") from None


def check_files(cfg: Config) -> None:
    missing = []
    for i, url in enumerate(cfg.input.urls):
        fs, p = fsspec.core.url_to_fs(url)
        if not fs.exists(p):
            missing.append(f"input.urls[{i}]: file not found: {url}")
    if cfg.input.images_from:
        plan = cfg.input.images_from.rstrip("/") + "/images/_shards/plan.json"
        fs, p = fsspec.core.url_to_fs(plan)
        if not fs.exists(p):
            missing.append(f"input.images_from: {cfg.input.images_from} is not a started run (no images/_shards/plan.json)")
    if cfg.input.serve_dir and not Path(cfg.input.serve_dir).is_dir():
        missing.append(f"input.serve_dir: folder not found: {cfg.input.serve_dir}")
    if cfg.regions is not None:
        paths = {"regions.scorer.pretrained": cfg.regions.scorer.pretrained,
                 "regions.detector.weights": cfg.regions.detector and cfg.regions.detector.weights}
        for key, value in paths.items():
            if value and "/" in value and not Path(value).is_file():  # a path (names and tags have no '/')
                missing.append(f"{key}: file not found: {value}")
    if missing:
        raise ConfigError("config refers to missing files:\n  " + "\n  ".join(missing))


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"unknown key {loc!r}{hint}; allowed keys here: {', '.join(allowed)}")
        elif kind == "missing":
            lines.append(f"missing required key {loc!r}")
        else:
            got = e.get("input")
            got_s = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{loc or '<top>'}: {e['msg']} (got {got_s[:80]})")
    return f"invalid {source}:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return sorted(model.model_fields)


def _model_of(annotation) -> Optional[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# Keys that change how a run executes, not what it produces.
# train: the trainer checks its checkpoint against the config itself (model/checkpoint.py); selftrain: each
# round records its own settings (workflows/selftrain.py).
EXECUTION_KEYS = ("ray", "run.stages", "download.threads", "train", "selftrain")


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts, ignoring execution keys."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        if any(path == k or path.startswith(k + ".") for k in EXECUTION_KEYS):
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_diff(a, b, path + "."))
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
