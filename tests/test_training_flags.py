"""The trainer's command line: transformers / diffusers spellings, precision and checkpointing flags, trackers,
recipes by name, `--help`, and the errors of bad or contradictory settings, a missing extra or an impossible
precision (all before any work)."""

from __future__ import annotations

import re
import sys

import pytest

from hf_longclip.training import ALIASES, PRECISION_FLAGS, parse_training_arguments
from hf_longclip.training.arguments import _field_names, build_argument_parser

#: A value for each aliased setting that differs from its default (command-line text, YAML text).
SAMPLES = {
    "base": ("some-org/some-clip", "some-org/some-clip"),
    "train_data": ("pairs.jsonl", "pairs.jsonl"),
    "eval_data": ("heldout.jsonl", "heldout.jsonl"),
    "num_workers": ("3", "3"),
    "per_device_train_batch_size": ("7", "7"),
    "eval_batch_size": ("9", "9"),
    "max_steps": ("11", "11"),
    "lr_scheduler_type": ("linear", "linear"),
    "warmup_steps": ("5", "5"),
    "weight_decay": ("0.2", "0.2"),
    "save_steps": ("13", "13"),
    "save_total_limit": ("4", "4"),
    "tracker_project": ("my-project", "my-project"),
    "hub_private": ("true", "true"),
    "disable_progress_bar": ("true", "true"),
}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_each_alias_sets_the_same_setting_as_our_spelling(alias, tmp_path):
    target = ALIASES[alias]
    flag_value, yaml_value = SAMPLES[target]
    ours = parse_training_arguments([f"--{target}", flag_value])
    assert ours != parse_training_arguments([])  # the sample value is not the default
    assert parse_training_arguments([f"--{alias}", flag_value]) == ours
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"{alias}: {yaml_value}\n")
    assert parse_training_arguments(["--config", str(recipe)]) == ours
    grouped = tmp_path / "grouped.yaml"  # under the group of the setting it stands for
    group = _field_names()[target]._argument_group_name
    grouped.write_text(f"{group}:\n  {alias}: {yaml_value}\n")
    assert parse_training_arguments(["--config", str(grouped)]) == ours


@pytest.mark.parametrize(
    "words, mixed_precision",
    [
        (["--bf16"], "bf16"),
        (["--fp16"], "fp16"),
        (["--bf16", "true"], "bf16"),
        (["--fp16", "yes"], "fp16"),
        (["--bf16", "false"], "no"),
        (["--bf16", "false", "--fp16"], "fp16"),
        (["--mixed_precision", "bf16", "--bf16"], "bf16"),  # two spellings, one value
        ([], "config"),
    ],
)
def test_precision_flags_map_onto_mixed_precision(words, mixed_precision, tmp_path):
    assert parse_training_arguments(words)[2].mixed_precision == mixed_precision
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{flag}: true\n" for flag in PRECISION_FLAGS if words == [f"--{flag}"]))
    if recipe.read_text():
        assert parse_training_arguments(["--config", str(recipe)])[2].mixed_precision == mixed_precision


@pytest.mark.parametrize(
    "words, towers",
    [
        (["--gradient_checkpointing"], "all"),
        (["--gradient_checkpointing", "true"], "all"),
        (["--gradient_checkpointing", "false"], "none"),
        (["--gradient_checkpointing", "text"], "text"),
        (["--gradient-checkpointing", "all"], "all"),
        ([], "none"),
    ],
)
def test_gradient_checkpointing_is_a_boolean_or_the_towers(words, towers, tmp_path):
    assert parse_training_arguments(words)[0].gradient_checkpointing == towers
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  gradient_checkpointing: true\n")
    assert parse_training_arguments(["--config", str(recipe)])[0].gradient_checkpointing == "all"


def test_every_tracker_accelerate_supports_is_accepted_when_installed(monkeypatch):
    import accelerate.utils
    from accelerate.utils import LoggerType

    names = [kind.value for kind in LoggerType]
    assert {"wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab"} <= set(names)
    for name in names:
        if name != "all":
            monkeypatch.setattr(accelerate.utils, f"is_{name}_available", lambda: True)
    train_args = parse_training_arguments(["--report_to", ",".join(names)])[2]
    assert train_args.trackers == names
    # not installed: an error naming the package, not accelerate's silent drop
    monkeypatch.setattr(accelerate.utils, "is_comet_ml_available", lambda: False)
    with pytest.raises(ValueError, match=r"comet_ml is not installed \(pip install comet-ml\)"):
        parse_training_arguments(["--report_to", "tensorboard,comet_ml"])
    assert parse_training_arguments(["--report_to", "none"])[2].trackers == []


@pytest.mark.parametrize(
    "words, message",
    [
        (["--base", "a/b", "--model_name_or_path", "c/d"], r"--model_name_or_path \('c/d'\) and --base \('a/b'\)"),
        (["--max_steps", "5", "--max_train_steps", "6"], r"--max_train_steps \(6\) and --max_steps \(5\)"),
        (["--model_name_or_path", "a/b", "--pretrained_model_name_or_path", "c/d"],
         r"--pretrained_model_name_or_path \('c/d'\) and --model_name_or_path \('a/b'\)"),
        (["--bf16", "--fp16"], r"--bf16 and --fp16 ask for two mixed precisions"),
        (["--mixed_precision", "fp16", "--bf16"], r"--bf16 \('bf16'\) and --mixed_precision \('fp16'\)"),
        (["--mixed_precision", "bf16", "--bf16", "false"], r"--bf16 false and --mixed_precision bf16 contradict"),
        (["--gradient_checkpointing", "maybe"], "gradient_checkpointing must be a boolean, none, all or text"),
        (["--report_to", "tensorbored"], r"unknown tracker\(s\) \['tensorbored'\]; accelerate supports all, "),
        (["--config", "longclip-vit-b99"], r"'longclip-vit-b99' is neither a file nor a shipped recipe; shipped "
                                           r"recipes: .*longclip-vit-b16.*quickstart"),
    ],
)
def test_contradictory_or_unknown_settings_are_errors_naming_them(words, message):
    with pytest.raises(ValueError, match=message):
        parse_training_arguments(words)


def test_spellings_conflict_inside_a_recipe_but_the_command_line_overrides_either(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("base: a/b\nmodel_name_or_path: c/d\n")
    with pytest.raises(ValueError, match=r"recipe .*recipe.yaml: --model_name_or_path \('c/d'\) and --base"):
        parse_training_arguments(["--config", str(recipe)])
    recipe.write_text("model_name_or_path: a/b\nmax_train_steps: 7\nbf16: true\n")
    model_args, _, train_args = parse_training_arguments(["--config", str(recipe), "--base", "e/f", "--max_steps",
                                                          "9", "--mixed_precision", "no"])
    assert (model_args.base, train_args.max_steps, train_args.mixed_precision) == ("e/f", 9, "no")


def test_shipped_recipes_by_name_equal_the_files(tmp_path):
    from hf_longclip.resources import available_recipes, recipes_dir

    names = available_recipes()
    assert {"quickstart", "longclip-vit-b16", "betaclip-vit-b16-ce"} <= set(names)
    for name in names:
        assert parse_training_arguments(["--config", name]) == parse_training_arguments(
            ["--config", str(recipes_dir() / f"{name}.yaml")]
        )
    copy = tmp_path / "quickstart"  # a path wins over a shipped name only when it is a file
    copy.write_text("learning_rate: 0.5\n")
    assert parse_training_arguments(["--config", str(copy)])[2].learning_rate == 0.5


def test_help_groups_settings_with_defaults_and_lists_aliases_and_recipes(capsys, monkeypatch):
    from dataclasses import MISSING, fields

    from hf_longclip.training.arguments import ARGUMENT_CLASSES

    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping inside words ("clip-\nvit")
    with pytest.raises(SystemExit) as exit_info:
        parse_training_arguments(["--config", "quickstart", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for group in ("model:", "data:", "training:"):
        assert f" {group} " in text
    for cls in ARGUMENT_CLASSES:
        for f in fields(cls):
            if f.name.startswith("_") or f.default is MISSING:
                continue
            assert f"--{f.name}" in text
    help_of = {action.dest: action.help for action in build_argument_parser()._actions}
    assert all(help_of[f.name] for cls in ARGUMENT_CLASSES for f in fields(cls)), "a setting without help"
    assert "(default: 1e-06)" in text and "(default: openai/clip-vit-base-patch16)" in text
    for alias, target in ALIASES.items():
        assert re.search(rf"--{alias} \S+ alias of --{target} ", text), alias
    assert "--bf16 [BF16] use bf16 mixed precision" in text and "shipped recipes (--config NAME): " in text


# ----------------------------------------------------------------------------------------------- before any work
def _fail_if_called(*args, **kwargs):
    raise AssertionError("work started")


def test_bf16_without_support_is_an_error_before_any_work(monkeypatch, tmp_path):
    import accelerate.utils

    from hf_longclip.training import trainer

    monkeypatch.setattr(accelerate.utils, "is_bf16_available", lambda *a, **k: False)
    monkeypatch.setattr(trainer, "build_model_and_processor", _fail_if_called)
    args = parse_training_arguments(["--bf16", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="does not support bf16; use --fp16 or --mixed_precision no"):
        trainer.run(*args)
    # the same when accelerate's own configuration asks for bf16 (`accelerate launch --mixed_precision bf16`)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ValueError, match="does not support bf16"):
        trainer.run(*parse_training_arguments(["--output_dir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


def test_missing_train_extra_raises_the_documented_import_error(monkeypatch, tmp_path, capsys):
    from hf_longclip.extras import MissingExtraError
    from hf_longclip.training import run, trainer

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if `pip install hf-longclip` without [train]
    monkeypatch.setattr(trainer, "build_model_and_processor", _fail_if_called)
    args = parse_training_arguments(["--output_dir", str(tmp_path / "run")])
    with pytest.raises(MissingExtraError, match=r"training needs 'accelerate', which is not installed: pip install "
                                                r"'hf-longclip\[train\]'") as error:
        run(*args)
    assert isinstance(error.value, ImportError) and error.value.extra == "train"
    from hf_longclip.cli import main

    with pytest.raises(SystemExit, match=r"^error: training needs 'accelerate'.*hf-longclip\[train\]"):
        main(["train", "--output_dir", str(tmp_path / "run")])
    # a tracker needs accelerate too: the same error, at parse time
    with pytest.raises(MissingExtraError, match="report_to needs 'accelerate'"):
        parse_training_arguments(["--report_to", "tensorboard"])


def test_launcher_processes_that_accelerate_did_not_join_are_an_error(monkeypatch, tmp_path):
    """A launcher's WORLD_SIZE > 1 but no process group (accelerate on CPUs without cpu=True): refuse rather than let
    each process train alone, as rank 0, into the same folder."""
    from hf_longclip.training import trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer, "_launched_on_cpus", lambda: False)
    args = parse_training_arguments(["--base", "tiny-random", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="the launcher started 2 processes, but accelerate joined 1"):
        trainer.run(*args)


def test_cli_train_subcommand_is_the_trainer(monkeypatch):
    from hf_longclip import cli
    from hf_longclip.training import trainer

    seen = {}
    monkeypatch.setattr(trainer, "run", lambda *groups: seen.setdefault("groups", groups) and {"ok": True})
    assert cli.main(["train", "--config", "quickstart", "--model_name_or_path", "x/y", "--bf16"]) == 0
    model_args, _, train_args = seen["groups"]
    assert model_args.base == "x/y" and train_args.mixed_precision == "bf16" and model_args.base != "tiny-random"
    assert "train" in cli.build_parser().format_help()
