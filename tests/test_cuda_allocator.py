"""Expandable segments are turned on for training and benchmark runs, unless the user configured the allocator."""

import os

from ivl.cuda_allocator import SETTING, expandable_segments


def test_expandable_segments_are_set_when_nothing_is(monkeypatch):
    monkeypatch.setenv(SETTING, "")  # unset for the allocator, and restored after the test
    assert expandable_segments()
    assert os.environ[SETTING] == "expandable_segments:True"


def test_the_users_allocator_setting_is_kept(monkeypatch):
    monkeypatch.setenv(SETTING, "max_split_size_mb:512")
    assert not expandable_segments()
    assert os.environ[SETTING] == "max_split_size_mb:512"


def test_the_training_cli_sets_them_before_anything_runs(monkeypatch):
    from ivl.experiments import cli

    monkeypatch.setenv(SETTING, "")
    monkeypatch.setattr(cli, "_cli", lambda args, run: None)
    cli.main(["fit"])
    assert os.environ[SETTING] == "expandable_segments:True"
