"""The CLI explains itself: an example in every command's help (each one parses), `--print-config`
(every key with type, default and meaning; YAML that loads back to the same config), typo
suggestions for config keys, and shell completion of commands and config keys."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dlip.cli import build_parser, main
from dlip.cli.common import parse_args
from dlip.cli.examples import EXAMPLES
from dlip.config import ConfigError
from dlip.train.config import FinetuneConfig, PretrainConfig, load

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/pretrain/tiny_synth_teacher.yaml")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _commands(sub, (*path, name))


def _argv(example: str) -> list[str]:
    words = shlex.split(example.split("  #")[0])
    if words[0] == "eval":  # eval "$(dlip completion bash)"
        words = shlex.split(words[1].strip("$()"))
    return words[words.index("dlip") + 1 :]


def test_every_command_has_examples_that_parse():
    commands = dict(_commands(build_parser()))
    assert set(EXAMPLES) == set(commands)  # no command without, no example of a gone command
    for name, parser in commands.items():
        assert parser.epilog and parser.epilog.startswith("examples:"), name
        for example in EXAMPLES[name]:
            assert example in parser.format_help(), name
            args = parse_args(build_parser(), _argv(example))  # SystemExit if it does not parse
            assert args.command == name.split()[0], example


def test_print_config_lists_every_key_and_runs_as_given(tmp_path, capsys):
    argv = ["pretrain", "--config", TINY, f"run_dir={tmp_path}/run", "optim.lr=2e-4"]
    assert main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "NOT RUNNABLE" not in text
    leaves = [line for line in text.splitlines() if re.match(r"\s*\w+: \S.*  # ", line)]
    assert len(leaves) >= 57
    for line in leaves:  # value  # type; default D; meaning
        note = line.split("  # ", 1)[1]
        assert re.match(r".+; default .+; \S", note), line
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    want = load(TINY, [f"run_dir={tmp_path}/run", "optim.lr=2e-4"])
    assert load(str(printed)) == want
    assert "  lr: 0.0002  # a finite number; default 0.0003; BLIP init_lr" in text


def test_print_config_of_an_incomplete_finetune_says_what_is_missing(capsys):
    assert main(["finetune", "caption", "--print-config", "model.preset=test_tiny"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# dlip finetune caption: the resolved config")
    assert "# NOT RUNNABLE YET" in text and "set data.train" in text
    assert "task: caption" in text
    cfg = load(None, ["task=caption", "model.preset=test_tiny"], cls=FinetuneConfig, validate=False)
    assert cfg.task == "caption"


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("optim.lrr=1e-4", "did you mean optim.lr?"),
        ("lr=1e-4", "did you mean optim.lr?"),  # a key of another section
        ("run.max_step=3", "did you mean run.max_steps?"),
        ("loss.kd.weight.kd_itc=1", "did you mean loss.kd.weights?"),
        ("loss.kd.weights.kd_itcc=1", "did you mean loss.kd.weights.kd_itc?"),
    ],
)
def test_unknown_keys_suggest_the_closest(override, hint):
    with pytest.raises(ConfigError, match=re.escape(hint)):
        load(None, [override], cls=PretrainConfig)


def test_no_suggestion_for_a_key_like_nothing():
    with pytest.raises(ConfigError) as err:
        load(None, ["zzzz=1"], cls=PretrainConfig)
    assert "did you mean" not in str(err.value)


def _complete(line: str, cache: Path) -> list[str]:
    """What `dlip`'s argcomplete hook answers the shell for `line` (cursor at its end)."""
    out = cache / "completions"
    env = os.environ | {
        "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out), "XDG_CACHE_HOME": str(cache),
    }  # fmt: skip
    dlip = Path(sys.executable).parent / "dlip"
    subprocess.run([str(dlip)], env=env, check=True, timeout=120)
    return out.read_text().split("\013")


def test_shell_completion_of_commands_and_config_keys(tmp_path):
    assert {"pretrain", "finetune", "completion"} <= set(_complete("dlip ", tmp_path))
    keys = _complete("dlip pretrain optim.l", tmp_path)
    assert sorted(k.strip() for k in keys) == ["optim.lr="]
    assert (tmp_path / "dlip/config_keys.json").is_file()  # later completions skip torch
    kd = _complete("dlip finetune caption loss.kd.weights", tmp_path)
    assert [k.strip() for k in kd] == ["loss.kd.weights="]
    for shell in ("bash", "zsh", "fish"):
        script = subprocess.run(
            [str(Path(sys.executable).parent / "dlip"), "completion", shell],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        assert "dlip" in script and "_ARGCOMPLETE" in script, shell


def test_python_api_configs_match_the_cli_and_fail_alike():
    import dlip.eval
    import dlip.train

    cfg = dlip.train.configure("pretrain", TINY, {"optim.lr": 2e-4, "teacher.checkpoint": None})
    assert cfg == load(TINY, ["optim.lr=2e-4"])
    ft = dlip.train.configure("caption", None, {"model.preset": "test_tiny", "data.synth_dir": "s"})
    assert ft.task == "caption" and ft.data.synth_dir == "s"
    with pytest.raises(ConfigError, match=r"did you mean optim\.lr\?"):
        dlip.train.configure("pretrain", TINY, {"optim.lrr": 1e-4})
    with pytest.raises(ValueError, match="kind must be one of"):
        dlip.train.configure("distill")
    with pytest.raises(TypeError, match=r"dlip\.train\.configure"):
        dlip.train.run({"run": {}})
    with pytest.raises(ValueError, match="task must be one of"):
        dlip.eval.evaluate("ranking", "m", "d", "i", "o")
