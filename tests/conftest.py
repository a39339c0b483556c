"""Shared fixtures: a small prepared data folder, and running the CLI as a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def nanoseek(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanoseek", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, **kw)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A tokenizer (vocab 512) and prepared shards of the chatterbot corpus (ships with the install)."""
    base = tmp_path_factory.mktemp("data")
    r = nanoseek("tokenizer", "train", "--input", "chatterbot:english", "--vocab-size", "512", "--out",
                 str(base / "tok"))
    assert r.returncode == 0, r.stderr + r.stdout
    r = nanoseek("data", "prepare", "--input", "chatterbot", "--tokenizer", str(base / "tok"), "--out",
                 str(base / "data"), "--val-fraction", "0.05", "--no-progress")
    assert r.returncode == 0, r.stderr + r.stdout
    return base / "data"
