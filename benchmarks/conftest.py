"""Benchmarks are not part of the test run: `pytest benchmarks/ --benchmark-only` (see README)."""

import torch

torch.set_num_threads(2)
