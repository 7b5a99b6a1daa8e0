import pytest

from fedsynth.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_toml,
    load_config,
    parse_override,
)


def test_defaults_parse_and_are_frozen():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    assert cfg.data.dataset == "digits" and cfg.data.image_size == 16
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*valid keys: lr, batch_size"):
        config_from_dict({"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown config key 'sed' in top level"):
        config_from_dict({"sed": 1})


def test_bad_choice_lists_choices():
    with pytest.raises(
        ConfigError, match="choose one of: iid, dirichlet, pathological, class_disjoint, quantity"
    ):
        config_from_dict({"partition": {"scheme": "random"}})


def test_bad_type_and_bounds():
    with pytest.raises(ConfigError, match="expected int"):
        config_from_dict({"train": {"batch_size": "64"}})
    with pytest.raises(ConfigError, match="expected int"):
        config_from_dict({"train": {"batch_size": True}})
    with pytest.raises(ConfigError, match="must be > 0"):
        config_from_dict({"train": {"lr": 0.0}})
    with pytest.raises(ConfigError, match="must be a table"):
        config_from_dict({"train": 3})


def test_int_is_accepted_for_float_fields():
    cfg = config_from_dict({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="clients_per_round"):
        config_from_dict({"partition": {"num_clients": 2}, "federation": {"clients_per_round": 3}})
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        config_from_dict({"data": {"dataset": "npz"}})
    with pytest.raises(ConfigError, match=r"exchange\.topk_ratio = 1\.5 must be in \(0, 1\]"):
        config_from_dict({"exchange": {"codec": "topk", "topk_ratio": 1.5}})
    with pytest.raises(ConfigError, match="topk_ratio"):
        config_from_dict({"exchange": {"topk_ratio": 0.0}})


def test_overrides_parse_toml_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("model.preset=tiny") == (["model", "preset"], "tiny")
    assert parse_override("seed=7") == (["seed"], 7)
    assert parse_override("model.conditional=false") == (["model", "conditional"], False)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("train.lr")
    merged = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "sample.steps=4"])
    assert merged == {"train": {"lr": 0.5}, "sample": {"steps": 4}}


def test_load_roundtrip(tmp_path):
    src = tmp_path / "c.toml"
    src.write_text("seed = 3\n[train]\nlr = 0.002\n")
    cfg = load_config(src, ["sample.steps=7"])
    assert cfg.seed == 3 and cfg.train.lr == 0.002 and cfg.sample.steps == 7
    (tmp_path / "resolved.toml").write_text(config_toml(cfg))
    assert load_config(tmp_path / "resolved.toml") == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("seed = = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_shipped_configs_parse():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml")):
        load_config(path)


def test_resume_may_change_how_long_a_run_goes_but_not_what_it_trained(tmp_path):
    from fedsynth.config import check_resume_changes

    saved = config_from_dict({"federation": {"rounds": 6}})
    longer = config_from_dict({"federation": {"rounds": 8}, "sample": {"per_class": 5}})
    assert check_resume_changes(saved, longer) == ["federation.rounds", "sample.per_class"]
    for key, value in (("train", {"lr": 0.01}), ("model", {"preset": "tiny"}), ("seed", 3)):
        with pytest.raises(ConfigError, match=rf"--resume cannot change {key}"):
            check_resume_changes(saved, config_from_dict({key: value}))


def test_non_utf8_config_is_one_line(tmp_path):
    from fedsynth.config import load_config

    path = tmp_path / "c.toml"
    path.write_bytes(b'seed = 1\nparadigm = "\xff"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: not UTF-8 text \(byte 21\)"):
        load_config(path)


@pytest.mark.parametrize("channels", [2, 5])
def test_channels_other_than_gray_or_rgb_fail_before_training(channels):
    with pytest.raises(
        ConfigError, match=rf"data.channels = {channels} is not valid; choose 0 \(as stored\), 1 or 3"
    ):
        config_from_dict({"data": {"channels": channels}})


def test_each_strategy_family_has_its_own_section_given_to_its_constructor(tmp_path):
    from fedsynth.strategies import build_strategy

    src = tmp_path / "c.toml"
    src.write_text('[strategy]\nname = "fedavgm"\n[strategy.fedavgm]\nserver_learning_rate = 0.5\n')
    cfg = load_config(src, ["strategy.fedavgm.server_momentum=0.3"])
    assert cfg.strategy.fedavgm.server_learning_rate == 0.5 and cfg.strategy.fedavgm.server_momentum == 0.3
    s = build_strategy(cfg)
    assert (s.server_learning_rate, s.server_momentum) == (0.5, 0.3)
    yogi = build_strategy(
        config_from_dict({"strategy": {"name": "fedyogi", "fedopt": {"eta": 0.2, "tau": 0.1}}})
    )
    assert (yogi.eta, yogi.tau, yogi.beta_2) == (0.2, 0.1, 0.99)
    assert "[strategy.fedopt]\n" in config_toml(cfg)  # written back as sections
    with pytest.raises(ConfigError, match=r"unknown config key 'strategy.krum.f' in \[strategy.krum\]"):
        config_from_dict({"strategy": {"krum": {"f": 1}}})
    with pytest.raises(ConfigError, match=r"strategy.fedexp.eps = 0.0 is not valid; it must be > 0.0"):
        config_from_dict({"strategy": {"fedexp": {"eps": 0.0}}})


def test_configs_with_the_old_flat_strategy_keys_keep_loading(tmp_path):
    src = tmp_path / "old.toml"
    src.write_text('[strategy]\nname = "fedadam"\neta = 0.05\ntau = 0.01\nserver_lr = 2.0\nnum_keep = 3\n')
    cfg = load_config(src)
    assert (cfg.strategy.fedopt.eta, cfg.strategy.fedopt.tau) == (0.05, 0.01)
    assert cfg.strategy.fedavgm.server_learning_rate == 2.0 and cfg.strategy.scaffold.server_lr == 2.0
    assert cfg.strategy.krum.num_nodes_to_select == 3
    # an old key as an override wins over the file, as any override does
    assert load_config(src, ["strategy.eta=0.5"]).strategy.fedopt.eta == 0.5
    new = tmp_path / "new.toml"
    new.write_text(config_toml(cfg))
    assert load_config(new, ["strategy.trim_beta=0.3"]).strategy.fedtrimmedavg.beta == 0.3
    # the same setting written both ways with different values is refused
    both = {"strategy": {"eta": 0.1, "fedopt": {"eta": 0.2}}}
    with pytest.raises(
        ConfigError, match=r"^strategy.eta and strategy.fedopt.eta disagree; keep strategy.fedopt.eta only$"
    ):
        config_from_dict(both)
    assert config_from_dict({"strategy": {"eta": 0.2, "fedopt": {"eta": 0.2}}}).strategy.fedopt.eta == 0.2
