"""Test-session settings shared by every test module."""

import os

import torch

# Under pytest-xdist each worker is its own process: one intra-op thread each keeps N workers on N
# cores instead of N * cores threads fighting for them (the suite runs ~2x faster on 2 cores).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
