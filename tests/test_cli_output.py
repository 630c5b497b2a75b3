"""What the command line prints: --help with each default once and no markup, one switch
for progress bars (off without a terminal), and train saying what it does at the end."""

from __future__ import annotations

import argparse
import io
import re

import pytest

from condnoise.app.cli import build_parser, main
from condnoise.app.common import show_progress

LONG_COMMANDS = ["corrupt", "train", "distill lcm", "finetune controlnet", "finetune t2i-adapter",
                 "sample", "evaluate", "features train", "theory gmm", "study", "demo",
                 "autoencoder train", "autoencoder eval", "latents extract"]  # fmt: skip
TINY = ["data.source=digits", "data.image_size=null", "model.size=T/2", "model.hidden=32",
        "model.depth=1", "model.heads=2", "model.patch=2", "train.batch_size=16",
        "train.warmup=0", "train.threads=1", "run.tensorboard=false"]  # fmt: skip


def _parsers(parser: argparse.ArgumentParser, name: str = "condnoise"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


ALL = dict(_parsers(build_parser()))


@pytest.mark.parametrize("name", sorted(ALL))
def test_help_shows_each_default_once_without_markup(name):
    parser = ALL[name]
    text = parser.format_help()
    assert "(default: None)" not in text
    assert "%%" not in text and "``" not in text and not re.search(r":[a-z]+:`", text), text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.help or action.help is argparse.SUPPRESS:
            continue
        entry = formatter._expand_help(action)
        assert entry.lower().count("default") <= 1, entry
        if action.required:
            assert "(default:" not in entry, entry


def test_help_states_the_defaults_that_exist(capsys):
    assert main(["sample", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 1000)" in text and "(default: dpm++)" in text
    assert "output folder --seed" in text  # --out is required: no default after it


@pytest.mark.parametrize("command", LONG_COMMANDS)
def test_every_long_command_has_the_progress_switch(command):
    assert "--no-progress" in ALL[f"condnoise {command}"].format_help()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("env", "flag", "tty", "shown"), [
    (None, False, True, True), (None, False, False, False), ("0", False, True, False),
    ("false", False, True, False), ("1", False, False, True), ("1", True, True, False),
])  # fmt: skip
def test_one_switch_decides_progress_bars(monkeypatch, env, flag, tty, shown):
    if env is None:
        monkeypatch.delenv("CONDNOISE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("CONDNOISE_PROGRESS", env)
    monkeypatch.setattr("sys.stderr", _Terminal() if tty else io.StringIO())
    assert show_progress(argparse.Namespace(no_progress=flag)) is shown


def test_train_and_sample_without_a_terminal(tmp_path, capsys, monkeypatch):
    """stderr captured (not a terminal): no bars, no carriage-return floods; train says that
    it is drawing its final sample grid. CONDNOISE_PROGRESS=1 brings the bars back."""
    monkeypatch.delenv("CONDNOISE_PROGRESS", raising=False)
    run = tmp_path / "run"
    grid = ["train.steps=2", "train.ckpt_every=2", "train.sample_every=2",
            "train.sample_steps=2", "train.sample_per_class=1"]  # fmt: skip
    assert main(["train", "fmnist-dit-s", *TINY, *grid, "--run-dir", str(run)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, err
    assert "condnoise train: drawing the final sample grid (step 2" in err, err
    assert (run / "samples" / "step_00000002.png").is_file()
    sample = ["sample", str(run), "--num", "4", "--steps", "2", "--guidance", "1"]
    assert main([*sample, "--out", str(tmp_path / "quiet")]) == 0
    assert "\r" not in capsys.readouterr().err
    monkeypatch.setenv("CONDNOISE_PROGRESS", "1")
    assert main([*sample, "--out", str(tmp_path / "bars")]) == 0
    assert "img/s" in capsys.readouterr().err
    assert main([*sample, "--out", str(tmp_path / "off"), "--no-progress"]) == 0
    assert "img/s" not in capsys.readouterr().err
