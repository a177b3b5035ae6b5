"""DistContext from launcher environments, and the design rule that only launcher/ reads them."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
import torch

from launcher.env import LaunchError, dist_context_from_env, under_launcher
from trainer.context import DistContext

REPO = Path(__file__).resolve().parents[1]


def test_no_launcher_is_single_process() -> None:
    ctx = dist_context_from_env("cpu", "auto", environ={})
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, "none")
    assert not ctx.distributed and ctx.is_main
    assert not under_launcher({})


def test_torchrun_variables() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ctx = dist_context_from_env("cpu", "auto", environ=env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert ctx.backend == "gloo" and ctx.device == torch.device("cpu")
    assert not ctx.is_main and under_launcher(env)


def test_slurm_variables() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
    }
    ctx = dist_context_from_env("cpu", "auto", environ=env)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (5, 8, 1, 4)


def test_inconsistent_environment_is_rejected() -> None:
    with pytest.raises(LaunchError, match="WORLD_SIZE"):
        dist_context_from_env("cpu", "auto", environ={"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="rank 4"):
        dist_context_from_env("cpu", "auto", environ={"RANK": "4", "WORLD_SIZE": "4"})


def test_cuda_request_without_cuda_fails_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LaunchError, match="cuda"):
        dist_context_from_env("cuda", "auto", environ={})


def test_single_context_helper() -> None:
    ctx = DistContext.single()
    assert ctx.world_size == 1 and ctx.device.type == "cpu"


BELOW_LAUNCHER = ("trainer", "partialfc", "dataio", "backbones", "evaluation", "common")


def _sources(packages: tuple[str, ...]) -> list[Path]:
    return [p for pkg in packages for p in sorted((REPO / pkg).rglob("*.py"))]


def test_only_launcher_reads_the_environment() -> None:
    pattern = re.compile(r"os\.environ|getenv\(")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(BELOW_LAUNCHER)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, f"environment read below launcher/: {offenders}"


def test_no_hard_coded_cuda_calls() -> None:
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(("launcher", *BELOW_LAUNCHER))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if ".cuda()" in line
    ]
    assert not offenders, f".cuda() instead of ctx.device: {offenders}"


def test_packages_import_downward() -> None:
    """partialfc/dataio/backbones/evaluation never import trainer or launcher; common (the
    lowest package, its argument checks) imports none of the project's packages."""
    pattern = re.compile(r"^\s*(from|import)\s+(trainer|launcher)\b")
    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(("partialfc", "dataio", "backbones", "evaluation"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
    trainer_up = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(("trainer",))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"^\s*(from|import)\s+launcher\b", line)
    ]
    assert not trainer_up, trainer_up
    common_up = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(("common",))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(
            r"^\s*(from|import)\s+(launcher|trainer|partialfc|dataio|backbones|evaluation)\b", line
        )
    ]
    assert not common_up, common_up


@pytest.mark.parametrize("keep_group", [False, True])
@pytest.mark.parametrize("fails", [False, True])
def test_worker_tears_the_group_down_only_when_asked_or_after_an_error(
    monkeypatch: pytest.MonkeyPatch, keep_group: bool, fails: bool
) -> None:
    """A launcher's rank (keep_group=True) leaves its process group to exit_process after a
    successful run (destroy_process_group after the final barrier has aborted finished gloo
    ranks); an in-process run destroys it; after an error it is always destroyed."""
    from launcher import worker
    from trainer.config import load_config

    calls: list[str] = []

    class FakeTrainer:
        def __init__(self, *_args: object) -> None:
            pass

        def fit(self) -> dict:
            calls.append("fit")
            if fails:
                raise RuntimeError("step failed")
            return {"stopped": "received SIGTERM", "checkpoint": "ckpt"}

    monkeypatch.setattr(worker, "Trainer", FakeTrainer)
    for name in ("init_process_group", "barrier", "destroy_process_group"):
        monkeypatch.setattr(worker.launch_env, name, lambda *_a, _n=name, **_k: calls.append(_n))
    config = load_config(REPO / "configs" / "demo_cpu.yaml", [])
    if fails:
        with pytest.raises(RuntimeError, match="step failed"):
            worker.run_worker(config, keep_group=keep_group)
    else:
        assert worker.run_worker(config, keep_group=keep_group)["checkpoint"] == "ckpt"
    expected = ["init_process_group", "fit"]
    if fails:
        expected.append("destroy_process_group")
    else:
        expected += ["barrier"] + ([] if keep_group else ["destroy_process_group"])
    assert calls == expected


def test_a_launchers_rank_ends_through_exit_process_only_from_the_console_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``facetrain train`` as a launcher's rank (RANK / WORLD_SIZE set, as under srun): the
    console entry ends the process with exit_process (no teardown of the live process
    group); ``cli.main`` called in-process returns instead."""
    from launcher import cli, worker

    ran: list[bool] = []  # keep_group of each run: a real run leaves its group alive then
    monkeypatch.setattr(
        worker, "run_worker", lambda _cfg, keep_group=False, stop=None: ran.append(keep_group)
    )
    monkeypatch.setattr("launcher.env.has_process_group", lambda: bool(ran) and ran[-1])

    def fake_exit(code: int) -> None:
        raise SystemExit(f"exit_process({code})")

    monkeypatch.setattr(worker, "exit_process", fake_exit)
    # The run plan reads the data's property file; this test has no data.
    monkeypatch.setattr(
        "trainer.plan.pack_facts", lambda _config: types.SimpleNamespace(as_dict=dict)
    )
    monkeypatch.setattr("trainer.plan.plan_run", lambda *_args: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", str(REPO / "configs" / "demo_cpu.yaml"), "--set", "data.val=[]"]
    assert cli.main(argv) == 0 and ran == [True]
    monkeypatch.setattr("sys.argv", ["facetrain", *argv])
    with pytest.raises(SystemExit, match=r"exit_process\(0\)"):
        cli.entry()
    assert ran == [True, True]
