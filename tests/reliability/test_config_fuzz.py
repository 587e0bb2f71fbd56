"""The config loader on arbitrary input: a ConfigError naming the problem, or a valid config; never another
exception (issue 10's fuzzing of configs)."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, load_config, load_train_config

from conftest import demo_config

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                      max_leaves=12)
SECTIONS = ["run", "ray", "input", "download", "captioners", "sentences", "export", "train"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(SECTIONS), key=st.one_of(st.text(max_size=12), st.sampled_from(
    ["dir", "seed", "shard_size", "urls", "synthetic", "image_size", "timeout", "allow_networks", "steps",
     "model", "batch_size", "quality", "min_words", "name", "backend", "max_samples"])), value=values)
def test_any_value_in_any_section_is_valid_or_a_named_error(tmp_path_factory, section, key, value):
    data = demo_config(tmp_path_factory.mktemp("fuzz") / "run")
    node = data.setdefault(section, {})
    if isinstance(node, list):
        node = node[0]
    node[key] = value
    try:
        load_config(data=data)
    except ConfigError as e:
        assert str(e).strip()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=values)
def test_any_yaml_document_is_valid_or_a_named_error(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("fuzzdoc") / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    for load in (lambda: load_config(str(path)), lambda: load_train_config(str(path))):
        try:
            load()
        except ConfigError as e:
            assert str(e).strip()


@given(text=st.text(max_size=200))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_text_file_is_valid_or_a_named_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzztext") / "c.yaml"
    path.write_text(text)
    try:
        load_config(str(path))
    except ConfigError as e:
        assert str(e).strip()


DOTTED = st.lists(st.one_of(st.sampled_from(SECTIONS + ["timeout", "0", "9", "name", "synthetic", "families", "x"]),
                            st.text(max_size=6)), min_size=1, max_size=4).map(".".join)


@given(override=st.one_of(st.text(max_size=40), st.builds(lambda k, v: f"{k}={v}", DOTTED, st.text(max_size=15))))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_override_is_valid_or_a_named_error(tmp_path_factory, override):
    data = demo_config(tmp_path_factory.mktemp("fuzzo") / "run")
    path = tmp_path_factory.mktemp("fuzzo2") / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load_config(str(path), [override])
    except ConfigError as e:
        assert str(e).strip()
