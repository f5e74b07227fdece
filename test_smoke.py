"""
The test suite: numbers, not smoke, despite the name. Runs in a few minutes on 2 CPU cores.

    python -m pytest -q test_smoke.py

Every model here is tiny and built by the tests themselves; nothing is downloaded.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, check=True, env=None, timeout=600):
    """Run one of the repo's scripts as a user would, from the repo root."""
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ===== core: model, diffusion, configurator =====


# ===== prepare.py =====


# ===== train.py =====


# ===== sample.py =====


# ===== eval.py =====


# ===== outpainting and high resolution =====
