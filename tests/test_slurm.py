"""`facetrain submit` against a real one-node Slurm (slurmctld + slurmd on localhost).

The job runs the CPU demo recipe with 2 processes on a tiny synthetic pack; a second job is
sent USR1 as Slurm does before preemption, checkpoints, is requeued and resumes.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, unavailable_reason

from evaluation.wandb_offline import find_run_log, read_history

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    c.start()
    yield c
    c.stop()


def _submit(cluster: SlurmCluster, tiny_dataset: Path, out: Path, name: str, *sets: str) -> int:
    overrides = [
        f"data.train={tiny_dataset / 'train'}",
        f"data.val=[{tiny_dataset / 'val.bin'}]",
        "data.workers=0",
        f"run.output_dir={out}",
        f"run.name={name}",
        "train.batch_size=2",
        "train.log_every=1",
        "eval.batch_size=16",
        *sets,
    ]
    cmd = [sys.executable, "-m", "launcher.cli", "submit", str(REPO / "configs" / "demo_cpu.yaml")]
    cmd += ["--nodes", "1", "--gpus-per-node", "0", "--signal-seconds", "30"]
    for item in overrides:
        cmd += ["--set", item]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=cluster.env, cwd=out, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


def _log(out: Path, name: str, job: int) -> str:
    path = out / name / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_submit_runs_the_demo_recipe(
    cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    job = _submit(cluster, tiny_dataset, tmp_path, "slurm_demo", "train.max_steps=4")
    state = cluster.wait(job, timeout_s=600)
    log = _log(tmp_path, "slurm_demo", job)
    assert state == "COMPLETED", log
    assert "facetrain summary" in log
    run = tmp_path / "slurm_demo"
    assert (run / "latest").read_text().strip() == "step-4"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2 and summary["train"]["steps"] == 4
    history = read_history(find_run_log(run))
    assert [r["_step"] for r in history if "train/loss" in r] == [1, 2, 3, 4]


def test_preempted_job_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    job = _submit(cluster, tiny_dataset, tmp_path, "slurm_pre", "train.max_steps=400")
    # Wait until the trainers are stepping (the progress bar reaches the job log).
    deadline = time.time() + 300
    while time.time() < deadline and not re.search(r"\d+/400", _log(tmp_path, "slurm_pre", job)):
        time.sleep(1)
    assert re.search(r"\d+/400", _log(tmp_path, "slurm_pre", job)), _log(tmp_path, "slurm_pre", job)
    # What Slurm does before a time limit or preemption with --signal=B:USR1@T.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env, check=True)
    state = cluster.wait(job, timeout_s=900, states=("COMPLETED", "FAILED", "CANCELLED"))
    log = _log(tmp_path, "slurm_pre", job)
    assert state == "COMPLETED", log
    assert "requeueing job" in log or "restart 1" in log, log
    summary = json.loads((tmp_path / "slurm_pre" / "summary.json").read_text())
    assert "resumed_from" in summary and summary["train"]["steps"] == 400
    assert summary["train"]["steps_this_run"] < 400
