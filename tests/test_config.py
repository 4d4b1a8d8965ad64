"""Config parsing, dotted overrides, and every config error (one line, exit 2, names the fix)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import ROOT, assert_user_error, run_cli
from dist_train.config import FIXED, MAY_CHANGE, Config, load_config
from dist_train.errors import UserError

SENTIMENT_YAML = ROOT / "configs" / "sentiment.yaml"


def test_sentiment_config_parses_into_typed_sections():
    cfg = load_config(SENTIMENT_YAML)
    assert isinstance(cfg, Config)
    assert cfg.model.pretrained == "all-MiniLM-L6-v2"
    assert cfg.data.train == "data/sentiment/train.tsv"
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-4
    assert cfg.task.label_names == ["negative", "positive"]


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(SENTIMENT_YAML, ["train.lr=3e-5", "data.max_length=64", "train.precision=bf16",
                                       "data.group_by_length=false", "task.label_names=[neg, pos]"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)  # "3e-5" is a str to YAML 1.1
    assert cfg.data.max_length == 64
    assert cfg.train.precision == "bf16"
    assert cfg.data.group_by_length is False
    assert cfg.task.label_names == ["neg", "pos"]


def test_exponent_numbers_in_free_form_sections_are_numbers(tmp_path):
    """model.config and engine.deepspeed.config are passed through; YAML 1.1 would hand them '1e-12' as a string."""
    path = tmp_path / "c.yaml"
    path.write_text("model: {config: {model_type: bert, layer_norm_eps: 1e-12}, tokenizer: t}\ndata: {train: x}\n")
    cfg = load_config(path, ["model.config.initializer_range=2e-2", "model.config.name=1e5x"])
    assert cfg.model.config == {"model_type": "bert", "layer_norm_eps": 1e-12, "initializer_range": 0.02,
                                "name": "1e5x"}


def test_a_model_config_that_transformers_rejects_is_one_line(tmp_path):
    result = run_cli("train", SENTIMENT_YAML, "model.pretrained=null", "model.tokenizer=all-MiniLM-L6-v2",
                     "model.config.model_type=bert", "model.config.layer_norm_eps=[1]",
                     f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}")
    assert_user_error(result, "model.config:", "layer_norm_eps")
    assert not (tmp_path / "out").exists()


def test_int_is_accepted_where_float_is_declared():
    epochs = load_config(SENTIMENT_YAML, ["train.epochs=2"]).train.epochs
    assert epochs == 2.0 and type(epochs) is float, (epochs, type(epochs))  # converted, not kept as int 2


@pytest.mark.parametrize("override, needles", [
    ("train.lrr=1e-4", ["unknown key 'train.lrr'", "did you mean 'lr'"]),
    ("trian.lr=1e-4", ["unknown key 'trian'", "did you mean 'train'"]),
    ("data.text_colum=x", ["unknown key 'data.text_colum'", "did you mean 'text_column'"]),
    ("train.epochs=three", ["'train.epochs' expects float", "'three'"]),
    ("data.max_length=1.5", ["'data.max_length' expects int", "1.5"]),
    ("data.group_by_length=maybe", ["'data.group_by_length' expects bool", "'maybe'"]),
    ("train.precision=fp8", ["'train.precision' expects", "'bf16'", "'fp8'"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size must be >= 1"]),
    ("train", ["is not KEY=VALUE"]),
])
def test_config_errors_name_key_and_fix(override, needles):
    with pytest.raises(UserError) as err:
        load_config(SENTIMENT_YAML, [override])
    for needle in needles:
        assert needle in str(err.value)


def test_model_needs_exactly_one_source(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"model": {"pretrained": "x", "config": {"model_type": "bert"}},
                                    "data": {"train": "t.tsv"}}))
    with pytest.raises(UserError, match="exactly one of model.pretrained"):
        load_config(both)
    with pytest.raises(UserError, match="needs model.tokenizer"):
        load_config(None, ["model.config={model_type: bert}", "data.train=t.tsv"])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_print_config_resolves_overrides():
    result = run_cli("train", SENTIMENT_YAML, "train.lr=3e-5", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["train"]["lr"] == 3e-5
    assert set(printed) >= {"model", "data", "task", "train", "engine", "checkpoint", "logging"}


def test_cli_unknown_key_is_one_line_exit_2():
    assert_user_error(run_cli("train", SENTIMENT_YAML, "train.lrr=1e-4"), "unknown key 'train.lrr'",
                      "did you mean 'lr'")


def test_every_config_key_declares_what_a_resume_may_change():
    """The resume policy lives on the fields (dataclass metadata): a field's own mark or its section's."""
    from dist_train.config import Config, resume_policies, to_dict

    policies = resume_policies()
    flat_keys = set()

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict) and f"{prefix}{key}" not in policies:
                walk(value, f"{prefix}{key}.")
            else:
                flat_keys.add(f"{prefix}{key}")

    walk(to_dict(Config()))
    assert flat_keys == set(policies)
    for key in ("model.pretrained", "task.name", "train.lr", "train.seed", "train.micro_batch_size",
                "data.max_length", "engine.deepspeed.zero_stage", "engine.deepspeed.offload_optimizer"):
        assert policies[key] == "fixed", key
    for key in ("train.epochs", "train.grad_accum", "data.train", "engine.kind", "checkpoint.every_steps",
                "logging.every_steps", "output_dir"):
        assert policies[key] == "may_change", key

    with pytest.raises(TypeError, match="bare has no resume policy"):
        resume_policies(_Unmarked)
    assert resume_policies(_Marked) == {"frozen.new_field": "fixed", "open.new_field": "may_change"}


def test_engine_options_of_earlier_versions_are_read_as_their_sections(tmp_path):
    """engine.zero_stage / offload_optimizer / offload_params / reshard_after_forward and engine.deepspeed given
    as DeepSpeed's own keys: the same config as the sections' keys, in a file and as overrides."""
    old = load_config(SENTIMENT_YAML, ["engine.kind=deepspeed", "engine.zero_stage=3", "engine.offload_params=true",
                                       "engine.offload_optimizer=true", "engine.deepspeed={overlap_comm: true}"])
    new = load_config(SENTIMENT_YAML, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3",
                                       "engine.deepspeed.offload_params=true", "engine.deepspeed.offload_optimizer=true",
                                       "engine.deepspeed.config={overlap_comm: true}"])
    assert old == new and new.engine.deepspeed.config == {"overlap_comm": True}
    fsdp = load_config(SENTIMENT_YAML, ["engine.kind=fsdp", "engine.reshard_after_forward=false",
                                        "engine.offload_params=true"])
    assert (fsdp.engine.fsdp.reshard_after_forward, fsdp.engine.fsdp.offload_params) == (False, True)
    path = tmp_path / "old.yaml"
    path.write_text(SENTIMENT_YAML.read_text() + "\nengine: {kind: deepspeed, zero_stage: 2, deepspeed: {zero_stage: 1}}\n")
    with pytest.raises(UserError, match="engine.zero_stage and engine.deepspeed.zero_stage are both given"):
        load_config(path)


def test_a_checkpoint_config_of_an_earlier_version_resumes_under_the_new_keys(tmp_path):
    """A run saved with engine.zero_stage etc. resumes under engine.deepspeed.*; a real change is still named."""
    from dist_train.config import to_dict
    from dist_train.run.resume import check_config

    cfg = load_config(SENTIMENT_YAML, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"])
    saved = to_dict(cfg)
    saved["engine"] = {"kind": "deepspeed", "zero_stage": 2, "offload_optimizer": False, "offload_params": False,
                       "deepspeed": None, "reshard_after_forward": True, "timeout_s": 300.0}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    check_config(tmp_path, cfg)
    changed = load_config(SENTIMENT_YAML, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"])
    with pytest.raises(UserError, match="engine.deepspeed.zero_stage: 2 -> 3"):
        check_config(tmp_path, changed)


@dataclasses.dataclass
class _Section:
    new_field: int = 0  # declared without a mark: inherits the section's


@dataclasses.dataclass
class _Marked:
    frozen: _Section = dataclasses.field(default_factory=_Section, metadata=FIXED)
    open: _Section = dataclasses.field(default_factory=_Section, metadata=MAY_CHANGE)


@dataclasses.dataclass
class _Unmarked:
    bare: int = 0


# -- the config reference -------------------------------------------------------------------------------------
def test_the_config_reference_page_is_what_the_code_generates():
    """docs/config-reference.md = `dist-train config --reference`: every key, with a docstring, a default and
    its resume policy (regenerate the page when this fails: dist-train config --reference > docs/config-reference.md)."""
    from dist_train.config import resume_policies
    from dist_train.config_reference import entries, reference

    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == reference(), "docs/config-reference.md is stale: dist-train config --reference > docs/config-reference.md"
    keys = {e["key"] for e in entries()}
    assert set(resume_policies()) <= keys and "model.lora.r" in keys
    assert all(e["doc"] and e["default"] and e["on_resume"] in ("fixed", "may change") for e in entries())
    lr = next(e for e in entries() if e["key"] == "train.lr")
    assert (lr["default"], lr["range"], lr["on_resume"]) == ("5.0e-05", "> 0", "fixed")
    assert "### `distill.weight`\n\ntype `float` · default `0.5` · range in [0, 1] · on resume: fixed" in page


def test_config_command_prints_the_config_with_its_defaults(tmp_path):
    shown = run_cli("config", "configs/sentiment.yaml", "train.lr=3e-5")
    assert shown.returncode == 0, shown.stderr
    (tmp_path / "full.yaml").write_text(shown.stdout)
    full = load_config(str(tmp_path / "full.yaml"))
    assert full.train.lr == 3e-5 and full.train.micro_batch_size == 32 and full.distill.teacher is None
    both = run_cli("config", "configs/sentiment.yaml", "--reference")
    assert both.returncode == 2 and "give no CONFIG with it" in both.stderr
