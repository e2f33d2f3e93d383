"""torch's CPU threads follow the CPUs a process may use (a container's quota), unless the user chose."""

import os

import joblib
import pytest
import torch

from ivl.cpu_threads import fit_threads_to_cpus


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_above_the_usable_cpus_are_lowered_for_this_process_and_its_children(threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(joblib, "cpu_count", lambda: 1)
    torch.set_num_threads(2)
    assert fit_threads_to_cpus() == 1
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"


def test_threads_within_the_cpus_or_chosen_by_the_user_are_left_alone(threads, monkeypatch):
    monkeypatch.setattr(joblib, "cpu_count", lambda: 1)
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert fit_threads_to_cpus() is None and torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert fit_threads_to_cpus() is None and torch.get_num_threads() == 1
