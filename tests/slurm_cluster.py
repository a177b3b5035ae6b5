"""A real Slurm cluster on localhost for tests: munged, slurmctld and one slurmd per node as
root, with their own key, ports, spool and state under a temporary folder.

Each node is a slurmd of its own on this machine (``slurmd -N nodeK``): node ``nodeK`` has its
own port and its own spool, pid and log files (``%n`` in slurm.conf), all at 127.0.0.1, so a
job of several nodes runs one task per "node" here as it would on a real cluster.

Installs Debian's slurm-wlm and munge when they are missing (needs root and the package
mirror). Callers skip with the reason returned by :func:`unavailable_reason`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

INSTALL_TIMEOUT_S = 900


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "real Slurm tests need root (slurmctld/slurmd/munged run as root)"
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        return "no slurm-wlm and no apt-get to install it"
    return None


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=INSTALL_TIMEOUT_S)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"],
        check=True,
        env=env,
        timeout=INSTALL_TIMEOUT_S,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is for sbatch/squeue calls.

    ``KillWait`` is Slurm's default (30 s): what a job gets between SIGTERM (``scancel``, the
    time limit) and SIGKILL. Each node declares ``cpus`` CPUs whatever this machine has
    (``config_overrides``), so jobs ask for as many CPUs as on a real node.
    """

    def __init__(self, root: Path, cpus: int = 8, nodes: int = 1) -> None:
        self.root = root
        self.cpus = cpus
        self.nodes = [f"node{k + 1}" for k in range(nodes)]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[Path] = []

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        node_lines = [
            f"NodeName={name} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} State=UNKNOWN"
            for name in self.nodes
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=facetraintest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={_free_port()}",
                    "AuthType=auth/munge",
                    # A requeued job waits for the credential lifetime before it starts again
                    # (120 s by default).
                    f"AuthInfo=socket={self.munge_socket},cred_expire=30",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool' / '%n'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "SlurmdParameters=config_overrides",
                    "JobRequeue=1",
                    "KillWait=30",
                    *node_lines,
                    f"PartitionName=test Nodes={','.join(self.nodes)} Default=YES "
                    "MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def start(self) -> None:
        ensure_installed()
        self._write_conf()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        r = self.root
        subprocess.run(
            [
                "munged",
                "--force",
                "--num-threads=4",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--pid-file={r / 'munged.pid'}",
                f"--seed-file={r / 'munge.seed'}",
            ],
            check=True,
            timeout=30,
        )
        self.processes.append(r / "munged.pid")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        self.processes.append(r / "slurmctld.pid")
        for name in self.nodes:
            (r / "spool" / name).mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["slurmd", "-f", str(self.conf), "-N", name], check=True, env=self.env, timeout=30
            )
            self.processes.append(r / f"slurmd-{name}.pid")
        deadline = time.time() + 60
        states: list[str] = []
        while time.time() < deadline:
            states = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env
            ).stdout.split()
            if len(states) == len(self.nodes) and all(
                s in ("idle", "mixed", "allocated") for s in states
            ):
                return
            time.sleep(1)
        raise RuntimeError(f"slurm nodes not idle ({states}); logs in {self.root / 'log'}")

    def job_info(self, job: int) -> dict[str, str]:
        """``scontrol show job``'s KEY=VALUE fields (JobState, Restarts, NumNodes, ...)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job)],
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout
        return dict(token.split("=", 1) for token in out.split() if "=" in token)

    def job_state(self, job: int) -> str:
        return self.job_info(job).get("JobState", "UNKNOWN")

    def wait(
        self, job: int, timeout_s: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    ) -> str:
        deadline = time.time() + timeout_s
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_state(job)
            if state in states:
                return state
            time.sleep(2)
        return state

    def stop(self) -> None:
        """Cancel what is left (a failed test's job) and let Slurm end it (KillWait), then
        end the daemons: SIGTERM, and SIGKILL for one still there 10 s later."""
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            queue = subprocess.run(
                ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env
            )
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
        pids = []
        for pid_file in reversed(self.processes):
            try:
                pids.append(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        for pid in pids:
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
