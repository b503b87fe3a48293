"""Helpers several test files share: the committed golden data under tests/data.

Tests read only files committed to this repository. A missing file fails the test that needs it
(never a skip): a checkout without its golden data must not pass with less coverage.
"""
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
ORACLE_DIR = DATA / "oracle"  # outputs of the official implementations (README.md there)
KEYS_DIR = DATA / "keys"  # full-size official checkpoint layouts: "key [shape]" per line


def say(line: str) -> None:
    """Print one line to stdout in a single write. Processes of one launch share the pipe; under
    PYTHONUNBUFFERED ``print`` writes the text and its newline apart, and two lines could mix."""
    os.write(1, (line + "\n").encode())


def data_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"committed test data {path} is missing: restore it from git "
                                f"(`git checkout -- {path.relative_to(ROOT)}`)")
    return path


def oracle_path(name: str) -> Path:
    return data_file(ORACLE_DIR / name)


def load_oracle(name: str):
    return torch.load(oracle_path(name), weights_only=True)


def official_key_shapes(key_file: str) -> "OrderedDict[str, torch.Tensor]":
    """A full-size official state dict as empty meta tensors, from tests/data/keys/<key_file>."""
    sd = OrderedDict()
    for line in data_file(KEYS_DIR / key_file).read_text().splitlines():
        if line.strip():
            key, shape = line.split(None, 1)
            sd[key] = torch.empty(json.loads(shape), device="meta")
    return sd


def step_gradients(model, x, seed):
    """One training step of ``model`` on ``x`` (a loss that weighs every logit) after seeding
    with ``seed``; returns {name: gradient} of every parameter and of the input ("input")."""
    model.train()
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    logits = model(x)
    (logits.pow(2).mean() + logits.sum() * 1e-3).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["input"] = x.grad
    return grads
