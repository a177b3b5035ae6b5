"""`facetrain submit` against a real Slurm on localhost: slurmctld and two slurmd "nodes".

Each job runs the CPU demo recipe on a tiny synthetic pack, with what Slurm does to it:

- a two-node job: one agent per node, both meet at the c10d rendezvous, the run finishes and
  its checkpoint holds every rank's classifier shard; the job's CPUs follow the data workers
  and extra sbatch options (--exclusive, --comment) reach Slurm;
- USR1 (as `--signal=B:USR1@T` sends it before the time limit): checkpoint, requeue, resume;
- the time limit (SIGTERM, no USR1 asked for): checkpoint, TIMEOUT, no requeue; the next
  submission of the run resumes from it; `scancel` (SIGTERM): checkpoint within KillWait
  (Slurm's default 30 s), CANCELLED, no requeue.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, unavailable_reason

from evaluation.wandb_offline import find_run_log, read_history

REPO = Path(__file__).resolve().parents[1]
REASON = unavailable_reason()
# Each test waits on Slurm (a time limit, a requeue, KillWait): minutes, more on a loaded machine.
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
    pytest.mark.timeout(1800),
]
KILL_WAIT_S = 30  # the cluster's KillWait, Slurm's default


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    c.start()
    yield c
    c.stop()


def _submit(
    cluster: SlurmCluster,
    tiny_dataset: Path,
    out: Path,
    name: str,
    sets: tuple[str, ...] = (),
    options: tuple[str, ...] = ("--nodes", "1", "--signal-seconds", "30"),
) -> int:
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
    cmd += ["--gpus-per-node", "0", *options]
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


def _steps_seen(log: str, total: int) -> list[int]:
    """The step counts the job's console showed ("N/total": progress lines or bar)."""
    return [int(n) for n in re.findall(rf"(\d+)/{total}\b", log)]


def _wait_for_step(out: Path, name: str, job: int, total: int, above: int) -> int:
    """Wait until the job's console shows a step past ``above``; returns the highest seen."""
    deadline = time.time() + 300
    while time.time() < deadline:
        seen = [n for n in _steps_seen(_log(out, name, job), total) if n > above]
        if seen:
            return max(seen)
        time.sleep(1)
    raise AssertionError(f"job {job} never passed step {above}:\n{_log(out, name, job)}")


def _latest(run: Path) -> Path:
    return run / (run / "latest").read_text().strip()


def test_two_node_job_meets_finishes_and_saves_every_shard(
    cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    job = _submit(
        cluster,
        tiny_dataset,
        tmp_path,
        "two_nodes",
        sets=("train.max_steps=4", "dist.nproc=1", "data.workers=1"),
        options=(
            "--nodes",
            "2",
            "--sbatch-arg=--exclusive",
            "--sbatch-arg=--comment=facetrain-test",
        ),
    )
    state = cluster.wait(job, timeout_s=600)
    log = _log(tmp_path, "two_nodes", job)
    assert state == "COMPLETED", log
    info = cluster.job_info(job)
    assert info["NumNodes"] == "2" and info["NodeList"] == "node[1-2]", info
    assert info["CPUs/Task"] == "2", info  # 1 rank per node x (1 data worker + 1)
    assert info["OverSubscribe"] == "NO" and info["Comment"] == "facetrain-test", info
    # One agent per node, each with its own node rank, both in the one run.
    assert "(node 0 of 2)" in log and "(node 1 of 2)" in log, log
    assert "facetrain summary" in log
    run = tmp_path / "two_nodes"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["derived"]["world_size"] == 2 and summary["train"]["steps"] == 4
    step = _latest(run)
    assert step.name == "step-4"
    assert json.loads((step / "meta.json").read_text())["world_size"] == 2
    rows = []
    for rank in range(2):
        shard = torch.load(step / f"classifier-rank{rank}.pt", weights_only=False)
        rows += range(shard["class_start"], shard["class_start"] + shard["num_local"])
        assert (step / f"trainer-rank{rank}.pt").is_file()
    assert sorted(rows) == list(range(summary["derived"]["num_classes"]))
    history = read_history(find_run_log(run))
    assert [r["_step"] for r in history if "train/loss" in r] == [1, 2, 3, 4]


def test_preempted_job_checkpoints_requeues_and_resumes(
    cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    job = _submit(cluster, tiny_dataset, tmp_path, "slurm_pre", sets=("train.max_steps=400",))
    _wait_for_step(tmp_path, "slurm_pre", job, 400, above=0)
    # What Slurm does before a time limit or preemption with --signal=B:USR1@T.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.env, check=True)
    state = cluster.wait(job, timeout_s=900, states=("COMPLETED", "FAILED", "CANCELLED"))
    log = _log(tmp_path, "slurm_pre", job)
    assert state == "COMPLETED", log
    assert "requeueing job" in log and "restart 1" in log, log
    assert cluster.job_info(job)["Restarts"] == "1"
    summary = json.loads((tmp_path / "slurm_pre" / "summary.json").read_text())
    assert "resumed_from" in summary and summary["train"]["steps"] == 400
    assert summary["train"]["steps_this_run"] < 400


def test_time_limit_then_resubmission_resumes_and_scancel_checkpoints(
    cluster: SlurmCluster, tiny_dataset: Path, tmp_path: Path
) -> None:
    """SIGTERM, from the time limit and from scancel: a checkpoint, no requeue."""
    total, name, run = 100000, "slurm_term", tmp_path / "slurm_term"
    sets = (f"train.max_steps={total}", "data.workers=1")  # runs until stopped
    # 1. The time limit, with no USR1 before it (--signal-seconds 0).
    job = _submit(
        cluster,
        tiny_dataset,
        tmp_path,
        name,
        sets,
        ("--nodes", "1", "--time", "1", "--signal-seconds", "0"),
    )
    state = cluster.wait(job, timeout_s=600)
    log = _log(tmp_path, name, job)
    assert state == "TIMEOUT", log
    assert "got TERM" in log and "not requeued" in log and "requeueing" not in log, log
    assert "received SIGTERM" in log and "received SIGUSR1" not in log, log
    assert cluster.job_info(job)["Restarts"] == "0"
    first = _latest(run)
    first_step = json.loads((first / "meta.json").read_text())["step"]
    assert first_step > 0
    # 2. The same run submitted again resumes from that checkpoint; then it is scancel'ed.
    job = _submit(cluster, tiny_dataset, tmp_path, name, sets, ("--nodes", "1"))
    reached = _wait_for_step(tmp_path, name, job, total, above=first_step)
    cancelled_at = time.time()
    subprocess.run(["scancel", str(job)], env=cluster.env, check=True)
    state = cluster.wait(job, timeout_s=300)
    log = _log(tmp_path, name, job)
    assert state == "CANCELLED", log
    assert min(_steps_seen(log, total)) >= first_step, log  # resumed, did not start over
    assert "got TERM" in log and "not requeued" in log and "requeueing" not in log, log
    assert "received SIGTERM" in log and "received SIGUSR1" not in log, log
    info = cluster.job_info(job)
    assert info["Restarts"] == "0" and info["JobState"] == "CANCELLED", info
    last = _latest(run)
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] >= reached > first_step, (meta["step"], reached, first_step)
    assert meta["wandb_id"] == json.loads((first / "meta.json").read_text())["wandb_id"]
    written = (last / "meta.json").stat().st_mtime
    assert cancelled_at <= written < cancelled_at + KILL_WAIT_S
