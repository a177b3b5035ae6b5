"""Shared fixtures: small synthetic packs built once per test session."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Registered here, not in pyproject.toml: a change there makes `make` reinstall the venv.
    config.addinivalue_line(
        "markers",
        "kernel_build: compiles the fused CPU kernels once into a temporary folder (a minute)",
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 identities x 4 images (train pack) + 20 held-out pairs, as `facetrain synth` writes."""
    from dataio.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("tiny_synth")
    write_synthetic_dataset(
        str(out),
        identities=6,
        images_per_id=4,
        val_identities=5,
        val_images_per_id=4,
        val_pairs=20,
        seed=3,
        workers=1,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def tiny_pack(tiny_dataset: Path) -> Path:
    return tiny_dataset / "train"


@pytest.fixture(autouse=True)
def _dali_garbage_collected_here():
    """After each test, once DALI is loaded: the test's unreachable DALI pipelines are
    collected in this process. Left to a later collection, one can run inside a torch
    DataLoader worker just forked (multiprocessing's after-fork hooks allocate), where the
    pipeline's __del__ waits for DALI threads that a forked child does not have: the worker
    hangs and so does its test (seen in test_midrun_data_faults, a DALI case before a torch
    one)."""
    yield
    if "nvidia.dali" in sys.modules:
        gc.collect()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on a shared 2-core box, 2 OpenMP threads that spin-wait for each
    other make small convolutions ~50x slower. Modules opt in with ``pytestmark``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any start of training, a job submission or a model load is a test failure (for checks
    that must come before any of them)."""

    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a process, job or model was started before the check")

    monkeypatch.setattr("launcher.train_commands._spawn_torchrun", started)
    monkeypatch.setattr("launcher.worker.run_worker", started)
    monkeypatch.setattr("launcher.submit.submit", started)
    monkeypatch.setattr("launcher.tools.make_embedder", started)
