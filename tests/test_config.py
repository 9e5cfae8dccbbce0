"""Config tree: YAML + extends + dotted overrides resolve into checked dataclasses; bad input is named."""

from pathlib import Path

import pytest
import yaml

from longseq.config import (Config, ConfigError, describe_fields, from_dict, load_config, parse_override,
                            to_dict, to_yaml)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_valid_and_round_trip_through_yaml():
    config = Config()
    assert from_dict(Config, yaml.safe_load(to_yaml(config))) == config


def test_yaml_sets_a_subset_and_defaults_fill_the_rest(tmp_path):
    path = write(tmp_path / "x.yaml", {"model": {"d_model": 64}, "train": {"steps": 7}})
    config = load_config(path)
    assert config.model.d_model == 64 and config.train.steps == 7
    assert config.model.num_layers == Config().model.num_layers


def test_extends_merges_recursively_and_child_wins(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"d_model": 64, "num_layers": 3}, "optim": {"lr": 0.01}})
    child = write(tmp_path / "child.yaml", {"extends": "base.yaml", "model": {"num_layers": 5}})
    config = load_config(child)
    assert (config.model.d_model, config.model.num_layers, config.optim.lr) == (64, 5, 0.01)


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_dotted_overrides_win_over_the_file_and_parse_yaml_values(tmp_path):
    path = write(tmp_path / "x.yaml", {"train": {"steps": 7}})
    config = load_config(path, ["train.steps=500", "model.mixer=attention", "model.num_kv_heads=null",
                                "model.hybrid_pattern=[attention,long_conv]", "optim.lr=3e-4"])
    assert config.train.steps == 500 and config.model.mixer == "attention"
    assert config.model.num_kv_heads is None and config.optim.lr == pytest.approx(3e-4)
    assert config.model.hybrid_pattern == ("attention", "long_conv")


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("train.steps")


@pytest.mark.parametrize("override, message", [
    ("model.d_modle=64", r"model\.d_modle: unknown key; did you mean model\.d_model\?"),
    ("trian.steps=3", r"trian: unknown key; did you mean train\?"),
    ("data.mqar.num_pairs=3", r"data\.mqar\.num_pairs: unknown key; did you mean data\.mqar\.num_kv_pairs\?"),
])
def test_unknown_key_is_named_with_the_closest_valid_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("model.d_model=big", r"model\.d_model: expected an integer, got str 'big'"),
    ("model.d_model=64.5", r"model\.d_model: expected an integer, got float 64\.5"),
    ("train.progress=maybe", r"train\.progress: expected true or false"),
    ("optim.lr=fast", r"optim\.lr: expected a number"),
    ("model.mixer=atention", r"model\.mixer: expected one of .* \(did you mean 'attention'\?\)"),
    ("model.hybrid_pattern=attention", r"model\.hybrid_pattern: expected a list"),
    ("model.hybrid_pattern=[attention,mamba]", r"model\.hybrid_pattern\[1\]: expected one of"),
    ("model.long_conv=3", r"model\.long_conv: expected a mapping"),
])
def test_wrong_type_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", r"optim\.lr: must be > 0, got 0"),
    ("model.dropout=1.0", r"model\.dropout: must be < 1"),
    ("train.steps=0", r"train\.steps: must be >= 1, got 0"),
    ("model.long_conv.squash_lambda=-0.1", r"model\.long_conv\.squash_lambda: must be >= 0"),
    ("mesh.data=0", r"mesh\.data: must be a positive device count or -1"),
    ("optim.lr=nan", r"optim\.lr: expected a finite number, got nan"),
    ("optim.grad_clip=.inf", r"optim\.grad_clip: expected a finite number, got inf"),
    ("model.dropout=nan", r"model\.dropout: expected a finite number"),
    ("train.seed=9223372036854775807", r"train\.seed: must be <= 2147483646"),
    ("train.name=../elsewhere", r"train\.name: '\.\./elsewhere' must be a plain directory name"),
])
def test_out_of_range_value_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["model.d_model=100", "model.num_heads=3"], r"model\.d_model: 100 is not divisible by num_heads=3"),
    (["model.num_heads=4", "model.num_kv_heads=3"], r"model\.num_kv_heads: num_heads=4 is not divisible"),
    (["model.mixer=attention", "model.num_heads=4", "model.attention_parallel=usp", "mesh.seq_kv=8", "mesh.data=1", "data.batch_size=8"],
     r"model\.attention_parallel: usp runs Ulysses over mesh\.seq_kv=8 devices, which needs num_heads=4 divisible by 8"),
    (["data.seq_len=16", "data.mqar.num_kv_pairs=8"], r"data\.seq_len: 16 is too short for task=mqar"),
    (["data.task=selective_copying", "data.seq_len=20"], r"data\.seq_len: 20 is too short for task=selective_copying"),
    (["mesh.data=3", "data.batch_size=32"], r"data\.batch_size: 32 is not divisible by the mesh\.data × mesh\.fsdp = 3 × 1 batch devices"),
    (["mesh.fsdp=3", "data.batch_size=32"], r"data\.batch_size: 32 is not divisible by mesh\.fsdp=3 \(the batch splits over the fsdp devices too\)"),
    (["model.mixer=hybrid", "model.hybrid_pattern=[]"], r"model\.hybrid_pattern: must name at least one"),
    (["model.mixer=attention", "model.d_model=100", "model.num_heads=4"], r"model\.d_model: head_dim .* must be even"),
])
def test_inconsistent_combination_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_file_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("model: {d_model: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_hybrid_layer_mixers_cycle_through_the_pattern():
    config = load_config(None, ["model.mixer=hybrid", "model.num_layers=5",
                                "model.hybrid_pattern=[gated_conv,gated_conv,attention]"])
    assert config.model.layer_mixers() == ("gated_conv", "gated_conv", "attention", "gated_conv", "gated_conv")
    assert load_config(None, ["model.num_layers=3"]).model.layer_mixers() == ("long_conv",) * 3


def test_every_leaf_key_is_documented():
    rows = describe_fields()
    keys = {key for key, _, _ in rows}
    assert "model.long_conv.squash_lambda" in keys and "data.mqar.num_kv_pairs" in keys
    assert all(help for _, _, help in rows), [key for key, _, help in rows if not help]
    # and every documented key can be overridden on its own
    flat = to_dict(Config())
    for key in keys:
        value = flat
        for part in key.split("."):
            value = value[part]
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        resolved = to_dict(load_config(None, [f"{key}={text}"]))
        for part in key.split("."):
            resolved = resolved[part]
        assert resolved == value, key


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_readme_documents_every_config_key_with_its_default():
    readme = (REPO / "README.md").read_text()
    for key, default, _ in describe_fields():
        assert f"| `{key}` | `{default}` |" in readme, f"README.md lacks the row of {key} (default {default})"


def test_odd_head_dim_is_fine_without_attention_layers():
    assert load_config(None, ["model.mixer=long_conv", "model.d_model=100", "model.num_heads=4"]).model.d_model == 100
