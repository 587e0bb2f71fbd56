"""Every trainable model by config name, whatever its kind: caft (model/caft.py), goal (model/goal.py) and
grouping (model/grouping.py). The trainer, the loader and the checkpoints pick the kind from here.

A non-CAFT model class offers what the trainer needs beyond forward(): `kind`, `data_options()` (loader
fields: its mode and options), `batch_inputs(batch, device)` (forward's keyword arguments), `input_size`
(the image size it takes, or None), `clamp_logit_scales()`, `logit_scales()`, `set_grad_checkpointing()`,
`evaluate(spec, device)` and `find_unused_parameters` (for DDP).
"""

from __future__ import annotations

import importlib
from dataclasses import fields, replace

MODULES = {"caft": "model.caft", "goal": "model.goal", "grouping": "model.grouping"}
CONFIG_CLASSES = {"caft": "CaftConfig", "goal": "GoalConfig", "grouping": "GroupingConfig"}


def _module(kind: str):
    return importlib.import_module(MODULES[kind])


def all_configs() -> dict[str, tuple[str, object]]:
    """name -> (kind, config)."""
    out = {}
    for kind in MODULES:
        for name, cfg in _module(kind).CONFIGS.items():
            out[name] = (kind, cfg)
    return out


def kind_of(name: str) -> str:
    found = all_configs().get(name)
    if found is None:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(all_configs())}")
    return found[0]


def config_class(kind: str):
    if kind not in MODULES:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODULES)}")
    return getattr(_module(kind), CONFIG_CLASSES[kind])


def from_config(kind: str, cfg):
    """A model of `kind` from its config object."""
    mod = _module(kind)
    if kind == "caft":
        return mod.CAFT(cfg)
    return mod.build_model(cfg)


def check_changes(name: str, changes: dict) -> None:
    """Raises ValueError naming the model, the field and the reason if `changes` does not fit the config `name`:
    an unknown field, or a value whose type differs from the field's default (None is always let through,
    as are any values for fields whose default is None; tuples take lists, floats take ints)."""
    kind = kind_of(name)
    cfg = all_configs()[name][1]
    known = [f.name for f in fields(cfg)]
    bad = [k for k in changes if k not in known]
    if bad:
        raise ValueError(f"unknown model config fields {bad} for {name} ({kind}); known: {', '.join(known)}")
    for k, v in changes.items():
        default = getattr(cfg, k)
        if default is None or v is None:
            continue
        want = (list, tuple) if isinstance(default, tuple) else (int, float) if isinstance(default, float) \
            else type(default)
        if not isinstance(v, want) or isinstance(v, bool) != isinstance(default, bool):
            raise ValueError(f"model config field {k!r} of {name}: {v!r} is a {type(v).__name__}, "
                             f"expected {type(default).__name__} (the default is {default!r})")


def build(name: str, **changes):
    """A model by config name, with field changes (e.g. pretrained='/path/to/clip.pt', backend='sfcn')."""
    check_changes(name, changes)
    kind, cfg = all_configs()[name]
    return from_config(kind, replace(cfg, **changes))


def config_from_fields(kind: str, values: dict):
    """A config object of `kind` from saved fields (lists back to tuples), ready to rebuild a saved model."""
    cls = config_class(kind)
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    hook = getattr(_module(kind), "for_loading", None)
    return hook(cfg) if hook else cfg
