"""One call that seeds Python, NumPy and torch (CPU and CUDA) and asks CUDA for repeatable kernels."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed every generator the job draws from. On a GPU, also make cuBLAS and cuDNN repeatable
    (``CUBLAS_WORKSPACE_CONFIG`` takes effect only if set before the first cuBLAS call: the runner
    calls this before the model loads). ``PYTHONHASHSEED`` reaches only subprocesses started later;
    this process's string hashing was fixed when it started (the tests' jobs set it)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
