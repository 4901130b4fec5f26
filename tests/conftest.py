"""Shared helpers: small configurations that keep every test in the suite fast on a 2-core CPU, and a way to run
the command line as a user does."""

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import h64lm


def small_config(**overrides) -> h64lm.H64LMConfig:
    """A few-thousand-parameter H64LM: 2 layers (dense then MoE), 4 query and 2 KV heads, 4 experts, top-2."""
    base = dict(vocab_size=101, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                expert_intermediate_size=24)
    return h64lm.H64LMConfig(**{**base, **overrides})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training processes, torchrun or the notebook; "
                                       "`pytest -m \"not slow\"` is the quick inner loop, CI runs everything")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(h64lm.__file__).resolve().parent

# A model small enough that a CLI run of a few steps takes seconds: 2 layers (dense, MoE), 4 experts.
TINY_FLAGS = ["--preset", "tiny", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads",
              "1", "--intermediate-size", "64", "--expert-intermediate-size", "32", "--num-experts", "4",
              "--max-position-embeddings", "64", "--seq-len", "32", "--warmup-steps", "2", "--log-every", "1",
              "--eval-batches", "2"]


def run_cli(*args, cwd=REPO, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(REPO / "h64lm.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_training(*args, log: Path) -> subprocess.Popen:
    """A training run in the background; its stderr (the progress bar) goes to the file `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, str(REPO / "h64lm.py"), "train", *map(str, args)], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def sample_articles(count: int, split: str = "valid") -> list[list[str]]:
    """The first `count` articles of a split of the bundled sample, each as its lines."""
    with gzip.open(REPO / "data" / "wikipedia_sample" / f"wiki.{split}.raw.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    articles, current = [], []
    for line in lines:
        if h64lm.is_article_heading(line) and current:
            articles.append(current)
            current = []
        current.append(line)
    articles.append(current)
    return [a for a in articles if any(s.strip() for s in a)][:count]


@pytest.fixture(scope="session")
def tokenizer():
    return h64lm.load_tokenizer()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder in WikiText-103's raw layout: wiki.train.raw, wiki.valid.raw, wiki.test.raw, of real articles."""
    folder = tmp_path_factory.mktemp("wikitext")
    articles = sample_articles(60)
    parts = {"train": articles[:40], "valid": articles[40:50], "test": articles[50:]}
    for split, arts in parts.items():
        (folder / f"wiki.{split}.raw").write_text("".join(line + "\n" for a in arts for line in a), encoding="utf-8")
    return folder
