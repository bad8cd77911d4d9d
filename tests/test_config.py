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


def test_old_model_config_without_new_fields_keeps_old_behaviour():
    """Checkpoints store config.json; one written before time_scale / attn_softcap existed lacks
    them and must load with what it was trained with: t scaled by 1000, no soft-capping."""
    from flm.config import ModelConfig

    stored = Config().to_dict()
    for key in ("time_scale", "attn_softcap"):
        del stored["model"][key]
    cfg = from_dict(Config, stored)
    assert cfg.model.time_scale == 1000.0 and cfg.model.attn_softcap == 0.0
    assert from_dict(ModelConfig, {"dim": 64}).time_scale == 1000.0


@pytest.mark.parametrize("legacy,mode", [(True, "st"), (False, "none")])
def test_learn_weighting_of_old_configs_maps_to_weighting(legacy, mode):
    stored = Config().to_dict()
    del stored["distill"]["weighting"]
    stored["distill"]["learn_weighting"] = legacy
    cfg = from_dict(Config, stored)
    assert cfg.distill.weighting == mode and not hasattr(cfg.distill, "learn_weighting")
    stored["distill"]["weighting"] = "s"  # the current field wins over a stale legacy one
    assert from_dict(Config, stored).distill.weighting == "s"
    del stored["distill"]["weighting"], stored["distill"]["learn_weighting"]
    assert from_dict(Config, stored).distill.weighting == "st"  # neither: the old default (True)


def test_weighting_and_target_dropout_overrides():
    cfg = apply_overrides(Config(), {"distill.weighting": "s", "distill.target_dropout": "false"})
    assert cfg.distill.weighting == "s" and cfg.distill.target_dropout is False
    with pytest.raises(ConfigError, match="expected one of"):
        apply_overrides(Config(), {"distill.weighting": "t"})
    with pytest.raises(ConfigError, match="unknown config key 'distill.learn_weighting'"):
        apply_overrides(Config(), {"distill.learn_weighting": "true"})


def test_paper_configs_follow_the_release():
    """Backbone, distillation weighting and hyperparameters of the released scripts (docs/fidelity.md)."""
    from pathlib import Path

    root = Path(__file__).parents[1] / "configs"
    for name in ("lm1b_small", "owt_small", "owt_large"):
        m = load_config(root / f"{name}.py").model
        assert (m.dropout, m.attn_softcap, m.time_scale) == (0.1, 50.0, 1.0), name
    for data, s1_batch in (("lm1b_small", 512), ("owt_small", 128), ("owt_large", 128)):
        s1, s2 = (load_config(root / f"{data}_distill{k}.py") for k in (1, 2))
        assert (s1.objective, s2.objective) == ("fmlm_stage1", "fmlm_stage2")
        assert (s1.distill.weighting, s2.distill.weighting) == ("s", "none"), data
        assert (s1.distill.boundary_prob, s2.distill.boundary_prob) == (64, 128), data
        assert (s1.batch_size, s2.batch_size) == (s1_batch, 512), data
        for cfg in (s1, s2):
            assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.steps) == (3e-4, 2500, 1_000_000), data
            assert cfg.optim.ema_decay == 0.9999 and cfg.distill.target_dropout and cfg.model.dropout == 0.1
            assert cfg.sample_steps == [1, 2, 4, 32]
