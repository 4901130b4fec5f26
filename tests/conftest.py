"""Shared helpers: small configurations that keep every test in the suite fast on a 2-core CPU, and a way to run
the command line as a user does."""

import contextlib
import gzip
import io
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as the processes below have it, before transformers is imported
import h64lm  # noqa: E402


def small_config(**overrides) -> h64lm.H64LMConfig:
    """A few-thousand-parameter H64LM: 2 layers (dense then MoE), 4 query and 2 KV heads, 4 experts, top-2."""
    base = dict(vocab_size=101, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                expert_intermediate_size=24)
    return h64lm.H64LMConfig(**{**base, **overrides})


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts training processes, torchrun or the notebook; "
                                       "`pytest -m \"not slow\"` is the quick inner loop, CI runs everything")


def pytest_collection_modifyitems(config, items):
    # The notebook's test is the longest by far (9 minutes on 2 cores): first, so that with pytest-xdist (`-n
    # auto`, as CI runs the suite) one worker runs it while the others run everything else.
    items.sort(key=lambda item: item.nodeid != "tests/test_notebook.py::test_notebook_runs_top_to_bottom")


if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes: one thread each, as many as cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


REPO = Path(h64lm.__file__).resolve().parent
PROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # for every `python h64lm.py` started

# A model small enough that a CLI run of a few steps takes seconds: 2 layers (dense, MoE), 4 experts.
TINY_FLAGS = ["--preset", "tiny", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads",
              "1", "--intermediate-size", "64", "--expert-intermediate-size", "32", "--num-experts", "4",
              "--max-position-embeddings", "64", "--seq-len", "32", "--warmup-steps", "2", "--log-every", "1",
              "--eval-batches", "2"]


def run_cli(*args) -> subprocess.CompletedProcess:
    """`python h64lm.py ARGS` as h64lm.main(ARGS) in this process, with one thread as run_process's processes have:
    the exit status and what was printed, as a finished process gives them. `python h64lm.py` itself is main() and
    sys.exit; a new process spends about 8 s importing torch and transformers before its first step,
    which the slow tests paid several hundred times. Tests of what only a process has (signals, a kill, torchrun,
    the lock between two processes) start one."""
    argv = [str(a) for a in args]
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = h64lm.main(argv)
        except SystemExit as e:  # argparse's own errors, and --help
            status = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # uncaught (--debug): what the interpreter prints, and its exit status
            traceback.print_exc()
            status = 1
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["h64lm.py", *argv], status, out.getvalue(), err.getvalue())


def run_process(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python h64lm.py ARGS` in a new process, as a user runs it."""
    return subprocess.run([sys.executable, str(REPO / "h64lm.py"), *map(str, args)], cwd=REPO, env=PROCESS_ENV,
                          capture_output=True, text=True, timeout=timeout)


def start_training(*args, log: Path) -> subprocess.Popen:
    """A training run in the background; its stderr (the progress bar) goes to the file `log`."""
    with open(log, "w") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen([sys.executable, str(REPO / "h64lm.py"), "train", *map(str, args)], cwd=REPO,
                                env=PROCESS_ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)


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
