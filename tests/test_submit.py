"""`facetrain submit --dry-run`: the job script's CPUs, pass-through sbatch options and signal
directive, and the options it refuses (the real-Slurm runs are in test_slurm.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launcher import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_cpu.yaml")  # dist.nproc: 2


def _script(tiny_dataset: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    argv = ["submit", DEMO, "--nodes", "2", "--dry-run", *args]
    argv += ["--set", f"data.train={tiny_dataset / 'train'}", "--set", "data.val=[]"]
    argv += ["--set", "train.batch_size=2"]
    assert cli.main(argv) == 0
    return capsys.readouterr().out


def _directives(script: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_cpus_follow_the_ranks_and_their_data_workers(
    tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("--gpus-per-node", "0", "--set", "data.workers=2"), "--cpus-per-task=6"),  # 2 x 3
        (("--gpus-per-node", "4", "--set", "data.workers=3"), "--cpus-per-task=16"),  # 4 x 4
        (("--gpus-per-node", "0", "--set", "data.workers=0"), "--cpus-per-task=2"),
        (("--gpus-per-node", "0", "--cpus-per-task", "5"), "--cpus-per-task=5"),
    ]
    for args, expected in cases:
        assert expected in _directives(_script(tiny_dataset, capsys, *args)), args


def test_sbatch_args_pass_through_and_signal_directive(
    tiny_dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = _script(
        tiny_dataset,
        capsys,
        "--gpus-per-node=0",
        "--sbatch-arg=--exclusive",
        "--sbatch-arg=--mem=64G",
        "--sbatch-arg=--constraint=a100&ib",
        "--account=proj",
        "--qos=high",
    )
    directives = _directives(script)
    for option in ("--exclusive", "--mem=64G", "--constraint=a100&ib", "--account=proj"):
        assert option in directives, directives
    assert "--qos=high" in directives and "--signal=B:USR1@120" in directives
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(
        i for i, line in enumerate(script.splitlines()) if line and not line.startswith("#")
    )
    assert all(not line.startswith("#SBATCH") for line in script.splitlines()[first_command:])
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    no_usr1 = _directives(_script(tiny_dataset, capsys, "--gpus-per-node=0", "--signal-seconds=0"))
    assert not any(d.startswith("--signal") for d in no_usr1), no_usr1


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--sbatch-arg=--nodes=3", "--sbatch-arg=--nodes=3: use facetrain submit's --nodes"),
        ("--sbatch-arg=-c 4", "use facetrain submit's --cpus-per-task"),
        ("--sbatch-arg=--signal=USR2@60", "use facetrain submit's --signal-seconds"),
        ("--sbatch-arg=--output=x.log", "the script sets it"),
        ("--sbatch-arg=exclusive", "not an sbatch option"),
        ("--sbatch-arg=--mem=1G\n--nodes=9", "one sbatch option per --sbatch-arg"),
        ("--signal-seconds=-5", "--signal-seconds must be >= 0"),
    ],
)
def test_refused_options_fail_with_one_line(
    tiny_dataset: Path, capsys: pytest.CaptureFixture[str], arg: str, message: str
) -> None:
    argv = ["submit", DEMO, "--nodes", "1", "--gpus-per-node", "0", "--dry-run", arg]
    argv += ["--set", f"data.train={tiny_dataset / 'train'}", "--set", "data.val=[]"]
    argv += ["--set", "train.batch_size=2"]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert not out and len(err.strip().splitlines()) == 1 and message in err, err
