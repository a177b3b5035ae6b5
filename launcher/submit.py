"""`facetrain submit`: render the sbatch script from slurm/ and hand it to sbatch."""

from __future__ import annotations

import re
import shlex
import string
import subprocess
import sys
from pathlib import Path

from trainer.config import Config, ConfigError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch.template"


class SubmitError(RuntimeError):
    """sbatch is missing or refused the job."""


def render_sbatch(
    config_path: str,
    overrides: list[str],
    config: Config,
    nodes: int,
    gpus_per_node: int,
    partition: str | None = None,
    time_limit: str | None = None,
    account: str | None = None,
    qos: str | None = None,
    cpus_per_task: int | None = None,
    signal_seconds: int = 120,
    workdir: Path | None = None,
) -> str:
    """The job script: one `facetrain train` agent per node, USR1 -> checkpoint -> requeue."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / config.run_dir).resolve()
    nproc = gpus_per_node or config.dist.nproc  # 0 GPUs: CPU processes from dist.nproc
    directives = []
    if gpus_per_node:
        directives.append(f"#SBATCH --gpus-per-node={gpus_per_node}")
    for flag, value in (
        ("partition", partition),
        ("time", time_limit),
        ("account", account),
        ("qos", qos),
    ):
        if value:
            directives.append(f"#SBATCH --{flag}={value}")
    exports = [
        f"export WANDB_MODE={shlex.quote(config.wandb.mode)}",
        f"export WANDB_PROJECT={shlex.quote(config.wandb.project)}",
        f"export WANDB_DIR={shlex.quote(str(run_dir))}",
    ]
    values = {
        "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", config.run.name),
        "nodes": nodes,
        "cpus_per_task": cpus_per_task or max(nproc, 1),
        "signal_seconds": signal_seconds,
        "run_dir": str(run_dir),
        "workdir": str(workdir),
        "extra_directives": "\n".join(directives),
        "exports": "\n".join(exports),
        "python": shlex.quote(sys.executable),
        "config": shlex.quote(str(Path(config_path).resolve())),
        "nproc": nproc,
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
