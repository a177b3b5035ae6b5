"""`facetrain submit`: render the sbatch script from slurm/ and hand it to sbatch.

The job's signals (the template says the same): USR1, sent ``--signal-seconds`` before the
time limit, makes the trainers checkpoint and the job requeue itself and resume; SIGTERM
(``scancel``, the time limit itself) makes them checkpoint within Slurm's KillWait and the job
ends without a requeue -- submitting the run again resumes it.
"""

from __future__ import annotations

import re
import shlex
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Config

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch.template"

# sbatch options the script sets itself, and the `facetrain submit` option to use instead
# (None: fixed by the script's design: one agent per node, requeue on USR1, log in the run).
_OWN = (
    (("nodes", "N"), "--nodes"),
    (("gpus-per-node",), "--gpus-per-node"),
    (("cpus-per-task", "c"), "--cpus-per-task"),
    (("partition", "p"), "--partition"),
    (("time", "t"), "--time"),
    (("account", "A"), "--account"),
    (("qos", "q"), "--qos"),
    (("signal",), "--signal-seconds"),
    (("ntasks", "n", "ntasks-per-node", "requeue", "no-requeue", "job-name", "J"), None),
    (("output", "o", "error", "e", "open-mode", "chdir", "D"), None),
)
_OWN_OPTIONS = {name: instead for names, instead in _OWN for name in names}


class SubmitError(RuntimeError):
    """sbatch is missing or refused the job."""


class SbatchArgError(ValueError):
    """A ``--sbatch-arg`` that is no sbatch option, or one the script sets itself."""


@dataclass(frozen=True)
class JobOptions:
    """The job's shape and the sbatch options of ``facetrain submit``."""

    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    time_limit: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    """None: the ranks per node x (``data.workers`` + 1)."""
    signal_seconds: int = 120
    """USR1 this long before the time limit; 0: no USR1 (the job ends at the limit)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, each written as an ``#SBATCH`` line as given."""


def check_sbatch_args(args: list[str]) -> None:
    """Each ``--sbatch-arg`` is one sbatch option on one line, not one the script sets."""
    for arg in args:
        where = f"--sbatch-arg={arg}"
        if "\n" in arg or "\r" in arg:
            raise SbatchArgError(f"--sbatch-arg={arg!r}: one sbatch option per --sbatch-arg")
        if not re.match(r"-[A-Za-z]|--[A-Za-z]", arg):
            raise SbatchArgError(f"{where}: not an sbatch option (e.g. --sbatch-arg=--exclusive)")
        name = arg[2:].split("=", 1)[0].split()[0] if arg.startswith("--") else arg[1]
        if name in _OWN_OPTIONS:
            instead = _OWN_OPTIONS[name]
            hint = (
                f"use facetrain submit's {instead}"
                if instead
                else "the script sets it (one agent per node, requeue on USR1, log in the run)"
            )
            raise SbatchArgError(f"{where}: {hint}")


def cpus_per_task(config: Config, nproc: int) -> int:
    """One task per node: its ranks, each with its decoding workers (``data.workers``)."""
    return max(nproc, 1) * (config.data.workers + 1)


def render_sbatch(
    config_path: str,
    overrides: list[str],
    config: Config,
    job: JobOptions,
    workdir: Path | None = None,
) -> str:
    """The job script: one `facetrain train` agent per node, USR1 -> checkpoint -> requeue."""
    check_sbatch_args(job.sbatch_args)
    if job.signal_seconds < 0:
        raise SbatchArgError(f"--signal-seconds must be >= 0, got {job.signal_seconds}")
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / config.run_dir).resolve()
    nproc = job.gpus_per_node or config.dist.nproc  # 0 GPUs: CPU processes from dist.nproc
    directives = []
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.signal_seconds:
        directives.append(f"--signal=B:USR1@{job.signal_seconds}")
    for flag, value in (
        ("partition", job.partition),
        ("time", job.time_limit),
        ("account", job.account),
        ("qos", job.qos),
    ):
        if value:
            directives.append(f"--{flag}={value}")
    if config.dist.elastic is not None:
        # A node lost must not end the job (Slurm's default) nor its step (srun's
        # --kill-on-bad-exit): the other nodes' agents restart their workers without it.
        directives.append("--no-kill")
    directives += job.sbatch_args
    exports = [
        f"export WANDB_MODE={shlex.quote(config.wandb.mode)}",
        f"export WANDB_PROJECT={shlex.quote(config.wandb.project)}",
        f"export WANDB_DIR={shlex.quote(str(run_dir))}",
    ]
    values = {
        "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", config.run.name),
        "nodes": job.nodes,
        "cpus_per_task": job.cpus_per_task or cpus_per_task(config, nproc),
        "run_dir": str(run_dir),
        "workdir": str(workdir),
        "directives": "\n".join(f"#SBATCH {d}" for d in directives),
        "exports": "\n".join(exports),
        "python": shlex.quote(sys.executable),
        "config": shlex.quote(str(Path(config_path).resolve())),
        "nproc": nproc,
        "kill_on_bad_exit": int(config.dist.elastic is None),
        "overrides": " ".join(f"--set {shlex.quote(o)}" for o in overrides),
    }
    return string.Template(TEMPLATE.read_text()).substitute(values)


def submit(script: str, run_dir: Path) -> int:
    """Write the script next to the run and sbatch it; returns the job id."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise SubmitError("sbatch not found: is this a Slurm login node?") from exc
    match = re.search(r"Submitted batch job (\d+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise SubmitError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return int(match.group(1))
