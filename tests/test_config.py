"""rsnl.config: the validated trial configuration and its one-line messages."""

from pathlib import Path

import pytest

from rsnl.config import ConfigError, TrialConfig, load_yaml, parse_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "rsnl" / "configs"


def error(values=None, **kw) -> str:
    """The ConfigError message of TrialConfig.from_dict, asserted to be one line."""
    with pytest.raises(ConfigError) as e:
        TrialConfig.from_dict({**(values or {}), **kw})
    msg = str(e.value)
    assert "\n" not in msg and msg == msg.strip()
    return msg


def test_defaults_follow_the_protocol():
    c = TrialConfig()
    assert (c.dataset, c.backbone, c.pretrained, c.shots, c.noise_type) == ("dtd", "RN50", "openai", 16, "ptnl")
    assert (c.lr, c.momentum, c.weight_decay, c.warmup_epochs, c.warmup_lr) == (0.002, 0.9, 5e-4, 1, 1e-5)
    assert (c.epochs, c.batch_size, c.n_ctx, c.class_token_position) == (50, 32, 16, "end")
    assert (c.alpha_base, c.alpha_rate, c.selector, c.gmm_reg_covar, c.gmm_threshold) == (0.2, 35.0, "gmm", 5e-4, 0.5)


def test_unknown_key_suggests_close_match():
    msg = error(noise_rat=0.5)
    assert msg.startswith("noise_rat: unknown key") and "did you mean 'noise_rate'" in msg


def test_wrong_type_names_key_and_value():
    msg = error(blocks="four")
    assert msg.startswith("blocks:") and "must be an integer" in msg and "'four'" in msg
    assert error(noise_rate="high").startswith("noise_rate: must be a number")
    assert error(csc="yes").startswith("csc: must be true or false")
    assert error(blocks=2.0).startswith("blocks: must be an integer")
    assert error(blocks=True).startswith("blocks: must be an integer")  # bool is not an int here
    assert error(shots=None).startswith("shots: must be an integer, got null")


@pytest.mark.parametrize("key,value,allowed", [
    ("noise_rate", 1.5, "[0.0, 1.0)"),
    ("noise_rate", 1.0, "[0.0, 1.0)"),
    ("noise_rate", -0.1, "[0.0, 1.0)"),
    ("blocks", 0, "[1, 64]"),
    ("blocks", 65, "[1, 64]"),
    ("lr", 0.0, "> 0.0"),
    ("shots", 0, ">= 1"),
    ("gce_q", 0.0, "(0.0, 1.0]"),
    ("alpha_rate", float("nan"), "> 0.0"),
])
def test_out_of_range(key, value, allowed):
    msg = error(**{key: value})
    assert msg.startswith(f"{key}: {value!r} is out of range") and msg.endswith(f"allowed: {allowed}")


def test_unknown_choice_suggests():
    msg = error(selector="gmmm")
    assert msg.startswith("selector: 'gmmm' is not allowed") and "did you mean 'gmm'" in msg
    assert "allowed: gmm, ratio, ot, none" in msg
    msg = error(noise_type="pair_flip")
    assert msg.startswith("noise_type:") and "did you mean 'pairflip'" in msg


def test_unknown_dataset():
    msg = error(dataset="dtdd")
    assert msg.startswith("dataset: 'dtdd' is not known") and "did you mean 'dtd'" in msg and "digits" in msg


def test_other_checks():
    assert error(ctx_init="  ").startswith("ctx_init:")
    assert error(device="gpu").startswith("device: 'gpu' is not allowed")
    assert error(backbone=" ").startswith("backbone:")
    assert TrialConfig(device="cuda:1").device == "cuda:1"


def test_coercions():
    c = TrialConfig(noise_rate=0, alpha_rate=35)
    assert isinstance(c.noise_rate, float) and isinstance(c.alpha_rate, float)
    for none in ("none", "None", "null", ""):
        assert TrialConfig(pretrained=none).pretrained is None


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="must be a mapping"):
        TrialConfig.from_dict(["dataset", "digits"])


def test_parse_overrides_reads_yaml_scalars():
    out = parse_overrides(["noise_rate=0.5", "blocks=4", "csc=true", "ctx_init=a photo of a",
                           "pretrained=null", "data_root=", "backbone=ViT-B-32"])
    assert out == {"noise_rate": 0.5, "blocks": 4, "csc": True, "ctx_init": "a photo of a",
                   "pretrained": None, "data_root": None, "backbone": "ViT-B-32"}
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["blocks"])


def test_yaml_files_and_overrides(tmp_path):
    c = TrialConfig.from_yaml(CONFIGS / "digits.yaml", overrides=["blocks=3", "noise_rate=0.25"])
    assert (c.dataset, c.backbone, c.pretrained, c.blocks, c.noise_rate) == ("digits", "rsnl-tiny", None, 3, 0.25)
    # layered: a method file over a dataset file, then the overrides
    c = TrialConfig.from_yaml(CONFIGS / "digits.yaml", CONFIGS / "methods" / "gce.yaml", overrides=["gce_q=0.3"])
    assert (c.dataset, c.loss, c.blocks, c.selector, c.gce_q) == ("digits", "gce", 1, "none", 0.3)
    for f in sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "methods").glob("*.yaml")):
        TrialConfig.from_dict(load_yaml(f))  # every shipped file is valid
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocks: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as e:
        load_yaml(bad)
    assert "\n" not in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("noise_rat: 0.5\n")
    with pytest.raises(ConfigError, match="noise_rat: unknown key"):
        TrialConfig.from_yaml(typo)


def test_replace_and_roundtrip():
    c = TrialConfig(dataset="digits", blocks=2)
    d = c.replace(blocks=4)
    assert d.blocks == 4 and c.blocks == 2 and d.dataset == "digits"
    assert TrialConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match="blocks: 0 is out of range"):
        c.replace(blocks=0)
