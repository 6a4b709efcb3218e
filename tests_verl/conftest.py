"""tests_verl/ runs in its own environment (make verl-venv: verl 0.9.1 pins transformers < 5.11)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import verl_cpu

verl_cpu.use_cpu_platform()  # before anything asks verl for its platform


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def process_group():
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return verl_cpu.make_model_dir(str(tmp_path_factory.mktemp("qwen3moe")))
