"""moebalance.parallel without a process group: a plain run's environment is completed, the EP
size is validated, the CPU gets gloo."""

from __future__ import annotations

import os

import pytest
import torch

from moebalance import ConfigError
from moebalance.parallel import check_ep_size, select_device, torchrun_environment


def test_torchrun_environment_completes_a_plain_run(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert torchrun_environment() == (0, 1, 0)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RuntimeError, match="set WORLD_SIZE"):
        torchrun_environment()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("MASTER_PORT")
    assert torchrun_environment() == (3, 4, 3) and os.environ["MASTER_PORT"] == "29500"


def test_check_ep_size_and_device():
    assert check_ep_size(None, 4) == 4 and check_ep_size(2, 4) == 2
    for bad in (0, 3):
        with pytest.raises(ConfigError, match="must be >= 1 and divide the world size 4"):
            check_ep_size(bad, 4)
    if not torch.cuda.is_available():
        assert select_device(0) == (torch.device("cpu"), "gloo")
