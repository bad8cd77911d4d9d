import pytest

from flm.config import Config, ConfigError, apply_overrides, from_dict, load_config


def test_overrides_are_typed_and_dotted(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("from flm.config import Config, ModelConfig\nconfig = Config(model=ModelConfig(dim=64))\n")
    cfg = load_config(path, **{"optim.lr": "1e-4", "steps": "7", "flow.use_tau": "false",
                               "sample_steps": "[1,4]", "optim.betas": "(0.8,0.9)"})
    assert cfg.model.dim == 64 and cfg.optim.lr == 1e-4 and cfg.steps == 7
    assert cfg.flow.use_tau is False and cfg.sample_steps == [1, 4] and cfg.optim.betas == (0.8, 0.9)


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'.*'lr'"):
        apply_overrides(Config(), {"optim.learning_rate": 1})
    with pytest.raises(ConfigError, match="unknown config key 'stepz'"):
        apply_overrides(Config(), {"stepz": 1})


def test_bad_values_are_errors():
    with pytest.raises(ConfigError, match=r"objective='gan'.*expected one of \['ar', 'flm', 'fmlm_stage1'"):
        apply_overrides(Config(), {"objective": "gan"})
    with pytest.raises(ConfigError, match="steps='many': expected int"):
        apply_overrides(Config(), {"steps": "many"})
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(Config(), {"model": 3})


def test_config_file_must_define_config(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must define `config"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")


def test_round_trip_through_dict():
    cfg = apply_overrides(Config(), {"model.dim": 32, "optim.betas": (0.5, 0.6), "objective": "fmlm_stage1"})
    assert from_dict(Config, cfg.to_dict()) == cfg


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.py")):
        cfg = load_config(path)
        assert cfg.batch_size > 0 and cfg.model.vocab_size > 0, path
