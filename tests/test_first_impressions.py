"""What a user notices first: ``--help`` that imports no torch, an ONNX export at opset 18
with no warnings on the console, and a DALI run that writes nothing into a read-only pack."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(1800)  # a training run and an export on a loaded 2-core box

# What --help must not import: each costs seconds (torch alone ~1 s on a warm disk).
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "wandb", "matplotlib", "nvidia.dali", "pydantic")


def warning_lines(stderr: str) -> list[str]:
    """Python warnings (``...Warning: ...``) and glog-style records (``W1207 00:46:32...``,
    ``[rank0]:W1207 ...``) of a console output."""
    pattern = re.compile(r"Warning\b|^(\[rank\d+\]:)?[WE]\d{4} \d\d:\d\d")
    return [line for line in stderr.splitlines() if pattern.search(line)]


def test_help_of_every_command_imports_no_heavy_module() -> None:
    """``facetrain --help`` and ``facetrain CMD --help`` for every subcommand: the parsers are
    built and printed without importing torch, numpy, onnx, wandb, DALI, ... (measured through
    ``sys.modules`` in a fresh interpreter, not by the clock)."""
    script = textwrap.dedent(
        f"""
        import argparse, sys
        from launcher.cli import build_parser, main
        (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
        names = sorted(sub.choices)
        for argv in (["--help"], *([name, "--help"] for name in names)):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        print("COMMANDS", *names)
        print("HEAVY", *[m for m in {HEAVY!r} if m in sys.modules])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    assert {"train", "submit", "export", "eval", "embed", "plots"} <= set(lines["COMMANDS"])
    assert lines["HEAVY"] == []
    assert "usage: facetrain export" in proc.stdout and "--opset" in proc.stdout


def _read_only_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in (*dst.iterdir(), dst):
        path.chmod(0o555 if path.is_dir() else 0o444)
    return dst


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    )


def test_dali_run_on_a_read_only_pack_and_a_quiet_export(tiny_dataset: Path, tmp_path: Path):
    """``facetrain train`` with the DALI loader on a read-only pack folder (as datasets on
    clusters often are): nothing is written into it, the image index lands in the run's
    ``cache/``; the final export and ``facetrain export`` write opset 18 by default, and no
    warning reaches the console."""
    pytest.importorskip("nvidia.dali")
    pack = _read_only_copy(tiny_dataset / "train", tmp_path / "ro_pack")
    before = _listing(pack)
    try:
        train = subprocess.run(
            [
                sys.executable, "-m", "launcher.cli", "train",
                str(REPO / "configs" / "demo_cpu.yaml"),
                "--set", f"data.train={pack}",
                "--set", f"data.val=[{tiny_dataset / 'val.bin'}]",
                "--set", f"run.output_dir={tmp_path / 'out'}",
                "--set", "run.name=ro",
                "--set", "data.loader=dali",
                "--set", "dist.nproc=1",
                "--set", "train.batch_size=4",
                "--set", "train.max_steps=2",
                "--set", "schedule.warmup_steps=1",
                "--set", "eval.batch_size=16",
            ],
            capture_output=True, text=True, cwd=tmp_path, timeout=900,
        )  # fmt: skip
        assert train.returncode == 0, f"{train.stdout}\n{train.stderr}"
        assert _listing(pack) == before  # not a byte, not a folder
    finally:
        pack.chmod(0o755)
    run = tmp_path / "out" / "ro"
    assert len(list((run / "cache").glob("images-*.idx"))) == 1  # the header pack's index
    summary = json.loads((run / "summary.json").read_text())
    assert summary["onnx"]["opset"] == 18
    assert warning_lines(train.stderr) == [], train.stderr

    export = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "export", str(run), "--out", "m.onnx"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr
    assert "(opset 18)" in export.stdout
    assert warning_lines(export.stderr) == [] and "torchvision" not in export.stderr
    assert os.path.isfile(tmp_path / "m.onnx")
