import pytest
import yaml

from pipeline.config import ConfigError, config_diff, load_config, parse_override
from workflows.cli import main
from workflows.rundir import RunDir

from conftest import demo_config


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_unknown_key_names_key_and_allowed(tmp_path):
    cfg = demo_config(tmp_path / "run")
    cfg["download"]["timout"] = 3
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    msg = str(e.value)
    assert "download.timout" in msg and "did you mean 'timeout'" in msg
    assert "image_size" in msg and "retries" in msg  # the allowed keys are listed


def test_wrong_type_and_bad_choice(tmp_path):
    cfg = demo_config(tmp_path / "run")
    cfg["download"]["timeout"] = "soon"
    cfg["download"]["resize_mode"] = "stretch"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    msg = str(e.value)
    assert "download.timeout" in msg and "'soon'" in msg
    assert "download.resize_mode" in msg and "'keep_ratio'" in msg and "'center_crop'" in msg


def test_missing_url_file_and_missing_section(tmp_path):
    with pytest.raises(ConfigError, match=r"input.urls\[0\]: file not found: .*nope.parquet"):
        load_config(data={"run": {"dir": str(tmp_path)}, "input": {"urls": str(tmp_path / "nope.parquet")}})
    with pytest.raises(ConfigError, match="missing required key 'run'"):
        load_config(data={"input": {"synthetic": {}}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_overrides_dotted_and_list_index(tmp_path):
    cfg = load_config(write(tmp_path, demo_config(tmp_path / "run")),
                      ["download.timeout=2.5", "run.stages=[download]", "captioners.0.name=orig"])
    assert cfg.download.timeout == 2.5
    assert cfg.run.stages == ["download"]
    assert cfg.captioners[0].name == "orig"
    with pytest.raises(ConfigError, match="unknown key 'download.nope'"):
        load_config(write(tmp_path, demo_config(tmp_path / "run")), ["download.nope=1"])
    with pytest.raises(ConfigError, match="index '3' out of range"):
        load_config(write(tmp_path, demo_config(tmp_path / "run")), ["captioners.3.name=x"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("novalue")


def test_cli_config_prints_resolved_and_fails_cleanly(tmp_path, capsys):
    path = write(tmp_path, demo_config(tmp_path / "run"))
    assert main(["config", str(path), "download.threads=3"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["download"]["threads"] == 3 and out["download"]["encode_format"] == "jpg"
    assert main(["config", str(path), "download.threads=lots"]) == 2
    assert "download.threads" in capsys.readouterr().err


def test_restart_with_other_config_refused_unless_forced(tmp_path):
    run = RunDir(tmp_path / "run")
    a = load_config(data=demo_config(tmp_path / "run"))
    assert run.check_config(a) == []
    b = load_config(data=demo_config(tmp_path / "run", **{"download.image_size": 64, "ray.num_cpus": 1}))
    with pytest.raises(ConfigError) as e:
        run.check_config(b)
    assert "download.image_size: 128 -> 64" in str(e.value) and "--force" in str(e.value)
    assert "ray" not in str(e.value)  # execution settings may change between restarts
    assert run.check_config(b, force=True) == ["download.image_size: 128 -> 64"]
    assert run.check_config(b) == []  # the snapshot now holds the new config


def test_config_diff_ignores_execution_keys():
    assert config_diff({"ray": {"address": None}, "a": 1}, {"ray": {"address": "auto"}, "a": 1}) == []
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}}) == ["a.b: 1 -> 2", "a.c: '<unset>' -> 3"]


def test_train_configs_load_and_name_bad_keys(tmp_path):
    from pathlib import Path

    from pipeline.config import load_train_config

    root = Path(__file__).resolve().parents[1]
    cfg, run = load_train_config(str(root / "configs" / "train" / "caft-b16-merged30m.yaml"), ["steps=10"])
    assert (cfg.model, cfg.batch_size, cfg.n_sub, cfg.k_chunks, cfg.steps, run) == ("caft-b16", 2048, 8, 4, 10, None)
    demo, run = load_train_config(str(root / "configs" / "demo.yaml"))
    assert demo.model == "caft-tiny" and run == "runs/demo" and demo.eval_where == {"split": "test"}
    bad = tmp_path / "t.yaml"
    bad.write_text("model: caft-tiny\nstepz: 3\nk_chunks: 9\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(str(bad))
    assert "unknown key 'train.stepz' (did you mean 'steps'?)" in str(e.value)


def test_bad_train_model_and_model_changes_fail_at_load_before_any_stage(tmp_path):
    cfg = demo_config(tmp_path / "run")
    cfg["train"] = {"model": "caft-tniy", "steps": 2}
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, cfg))
    msg = str(e.value)
    assert "train.model" in msg and "unknown model 'caft-tniy' (did you mean 'caft-tiny'?)" in msg
    assert "goal-tiny" in msg and "grouping-tiny" in msg  # every registered name is listed
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    cfg["train"] = {"model": "caft-tiny", "model_changes": {"backend": "sfcn", "embed_dimm": 32}}
    with pytest.raises(ConfigError, match=r"train.model_changes: .*unknown model config fields \['embed_dimm'\] "
                                          r"for caft-tiny \(caft\); known: .*embed_dim"):
        load_config(write(tmp_path, cfg))
    cfg["train"]["model_changes"] = {"embed_dim": "wide"}
    with pytest.raises(ConfigError, match=r"'embed_dim' of caft-tiny: 'wide' is a str, expected int"):
        load_config(write(tmp_path, cfg))
    cfg["train"] = {"model": "goal-tiny", "model_changes": {"pretrained": "/some/clip.pt"}}  # a None default
    assert load_config(write(tmp_path, cfg)).train.model_changes == {"pretrained": "/some/clip.pt"}
    assert main(["run", str(write(tmp_path, {**cfg, "train": {"model": "nope"}})), "--no-progress"]) != 0


def test_export_txt_names_a_caption_of_the_run(tmp_path):
    cfg = demo_config(tmp_path / "run")
    assert load_config(write(tmp_path, cfg)).txt_caption() == "source/caption"  # the first captioner's first
    cfg["export"] = {"txt": "source/captoin"}
    with pytest.raises(ConfigError, match=r"export.txt 'source/captoin' is not a caption of this run; "
                                          r"captions are source/caption"):
        load_config(write(tmp_path, cfg))
