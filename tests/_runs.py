"""Test helpers: real ``facetrain train`` runs of 2 gloo ranks on a tiny pack, as a user starts
them (the launcher, torchrun's agent, the workers), for tests of what the console shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from _packs import write_test_pack

from dataio.pack import FacePack
from dataio.shard_sampler import ShardSampler

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"

LABELS = [c for c in range(8) for _ in range(4)]
"""The classes of :func:`write_run_pack`'s images: 8 classes x 4 images, 4 steps an epoch."""
SIZE = (32, 32)
BATCH = 4
"""Images per rank and step of :func:`train_args`."""
SEED = 0
"""``run.seed`` of :func:`train_args` (decides each rank's shard)."""


def write_run_pack(out: Path) -> Path:
    """A tiny header pack of :data:`LABELS` (32 x 32 JPEGs, keys 1..32) for
    :func:`train_args` runs."""
    write_test_pack(out, LABELS, size=SIZE)
    return out


def train_args(pack: Path, out: Path, name: str, *extra: str) -> list[str]:
    """``facetrain train`` of the CPU demo recipe on ``pack``: 2 ranks, batch 4 per rank,
    the plain classifier, no decoding workers, no evaluation, export or wandb (``extra``:
    ``key=value`` sets or plain arguments)."""
    sets = {
        "data.train": str(pack),
        "data.val": "[]",
        "data.workers": "0",
        "run.output_dir": str(out),
        "run.name": name,
        "run.seed": str(SEED),
        "train.batch_size": str(BATCH),
        "train.log_every": "1",
        "train.eval_at_start": "false",
        "train.progress": "false",
        "schedule.warmup_steps": "0",
        "wandb.mode": "disabled",
        "export.onnx": "false",
        "eval.pixel_baseline": "false",
        "dist.nproc": "2",
        "partialfc.backend": "plain",  # no one-time kernel build line on the console
    }
    return train_command(sets, *extra)


FP32_STEP = {"train.precision": "fp32", "train.channels_last": "false"}
"""The backbone's step these runs take unless told otherwise: float32, contiguous (the demo
recipe's bf16 autocast and channels-last are for speed; the tests compare runs exactly, with
DeepSpeed too, which takes no bf16 on the CPU). A test of the recipe's step sets them back."""


def train_command(sets: dict[str, str], *extra: str) -> list[str]:
    """``facetrain train`` of the demo recipe with :data:`FP32_STEP`, then ``sets`` and
    ``extra`` as ``--set KEY=VALUE`` (an ``extra`` without ``=`` is passed as it is:
    ``--resume``, ``--nnodes 2``...)."""
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(DEMO)]
    for key, value in {**FP32_STEP, **sets}.items():
        cmd += ["--set", f"{key}={value}"]
    for item in extra:
        cmd += ["--set", item] if "=" in item else [item]
    return cmd


def run_train(pack: Path, out: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    """Run :func:`train_args` to its end (generous limit: a loaded 2-core machine)."""
    return subprocess.run(
        train_args(pack, out, name, *extra),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=out,
    )


def first_batch_keys(pack: Path, rank: int, skip_corrupt: bool = False) -> list[int]:
    """The record keys of ``rank``'s first batch of epoch 0 in a :func:`train_args` run of 2
    ranks (the torch loader's sharding: :class:`dataio.shard_sampler.ShardSampler`, over the
    images the pack has when opened with ``skip_corrupt``)."""
    world_size = 2
    with FacePack(pack, skip_corrupt=skip_corrupt) as face_pack:
        keys = face_pack.image_keys
        sampler = ShardSampler(len(keys), rank, world_size, seed=SEED, shuffle=True, drop_last=True)
        sampler.set_epoch(0)
        positions = np.fromiter(iter(sampler), dtype=np.int64)[:BATCH]
        return [int(keys[p]) for p in positions]
