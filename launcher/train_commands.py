"""``facetrain train`` and ``facetrain submit``: start a training run here, or on Slurm.

``train`` validates the config and the pack before any process starts; when it is not already
running under a launcher (torchrun, the DeepSpeed launcher, srun) and more than one process is
asked for, it starts torchrun itself and passes stop signals on to the workers. ``submit``
renders the sbatch script for a config (:mod:`launcher.submit`) after the same checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

from launcher import failure
from launcher.lifeline import LAUNCHER_PID_ENV, StopSignals
from launcher.run_lock import hold_run_lock
from trainer.stop import StopFlag

if TYPE_CHECKING:
    from trainer.config import Config


def cmd_train(args: argparse.Namespace) -> int:
    """Stop signals (launcher.lifeline) and the run folder's lock (launcher.run_lock) are
    taken for the whole command; the signals first, before torch starts a thread that would
    not block them (this module imports torch only after)."""
    with StopSignals(StopFlag()) as signals, contextlib.ExitStack() as held:
        return _train(args, signals, held)


def _train(args: argparse.Namespace, signals: StopSignals, held: contextlib.ExitStack) -> int:
    from launcher import env as launch_env  # torch, and its threads: after StopSignals
    from launcher.elastic import check_elastic_args
    from launcher.preflight import check_device, check_run_inputs
    from trainer.config import ConfigError, dump_config, load_config
    from trainer.plan import format_plan, pack_facts, plan_run

    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"dist.nproc={args.nproc}")
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    if args.engine is not None:
        overrides.append(f"dist.engine={args.engine}")
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} outside [0, --nnodes {args.nnodes})")
    if args.nnodes > 1 and not args.rdzv:
        raise ConfigError("--nnodes > 1 needs --rdzv HOST:PORT (the first node's address)")
    budget = _gpu_mem(args)
    config = load_config(args.config, overrides)  # fails here, before any process starts
    check_elastic_args(config, args.nnodes, args.rdzv)
    world = launch_env.planned_world_size(config.dist.nproc, args.nnodes)
    plan = plan_run(config, world, pack_facts(config).as_dict())
    check_run_inputs(config)  # data.val and --resume, read as the trainer will read them
    if not args.dry_run:  # a dry run (and submit) may plan for machines this one is not
        check_device(config)
    if args.dry_run:
        from trainer.memory_report import memory_report, run_device

        print(dump_config(config))
        print(format_plan(plan))
        print(memory_report(config, world, plan["pack"], run_device(config), budget))
        return 0
    if _node_zero(args):  # one holder per run, whatever the nodes and world size
        note = held.enter_context(hold_run_lock(config.run_dir))
        if note:
            print(f"facetrain: {config.run_dir}: {note}", flush=True)
    if signals.flag.is_set() and not launch_env.under_launcher():
        # (A rank of the user's torchrun / srun goes on to join its peers, which would wait
        # for it: the flag stops them all together before the first step.)
        print(f"facetrain: {signals.flag.reason} before the run started; nothing to checkpoint")
        return 0
    alone = config.dist.nproc == 1 and args.nnodes == 1 and config.dist.elastic is None
    if launch_env.under_launcher() or alone:
        from launcher.worker import run_worker

        # One rank of srun / torchrun / deepspeed leaves its process group to the process
        # exit (see entry); a single process run in-process tears it down.
        run_worker(config, keep_group=launch_env.under_launcher(), stop=signals.flag)
        return 0
    return _spawn_torchrun(args, overrides, config, signals)


def _node_zero(args: argparse.Namespace) -> bool:
    """Whether this process starts the run on node rank 0 (it holds the run folder's lock):
    global rank 0 under a launcher of the user's, else the launcher of node rank 0."""
    from launcher import env as launch_env

    if launch_env.under_launcher():
        return os.environ["RANK"] == "0"
    return args.node_rank == 0


def _gpu_mem(args: argparse.Namespace) -> int | None:
    """``--gpu-mem`` in bytes (None: not given); it needs ``--dry-run``."""
    from trainer.config import ConfigError
    from trainer.memory_plan import parse_size

    if args.gpu_mem is None:
        return None
    if not args.dry_run:
        raise ConfigError("--gpu-mem: only with --dry-run (it prints what fits)")
    return parse_size(args.gpu_mem)


def _spawn_torchrun(
    args: argparse.Namespace, overrides: list[str], config: Config, signals: StopSignals
) -> int:
    """Start ``dist.nproc`` workers on this node under torchrun's elastic agent: standalone
    on one node, or one agent per node meeting at the ``--rdzv`` endpoint (c10d).

    SIGTERM / SIGUSR1 sent to this process are passed on to the agent (``signals``), which
    passes them to the workers (each finishes its step, checkpoints and exits 0) and never
    lets torchrun act on them: Slurm (``scancel``, the time limit, a signal to a job step)
    signals every process of the job, the agent included, and torchrun would answer SIGTERM
    by killing the workers' process groups 30 s later at most, and die of SIGUSR1, while the
    workers save their checkpoint. The agent dies with this process (launcher.lifeline).
    """
    from launcher.elastic import AGENT_ENV, rendezvous_args

    nproc = config.dist.nproc
    # torchrun, which leaves a rank's failure told in one line to us (launcher.failure)
    cmd = [sys.executable, "-m", "launcher.agent"]
    if config.dist.elastic is not None:
        cmd += rendezvous_args(config.dist.elastic, args.node_rank, args.rdzv, config.run.name)
    elif args.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv}",
            f"--rdzv-id={config.run.name}",
        ]
    cmd += [
        f"--nproc-per-node={nproc}",
        f"--max-restarts={config.dist.max_restarts}",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",  # SIGTERM, SIGUSR1: launcher.lifeline
        "-m",
        "launcher.worker",
        args.config,
    ]
    for item in overrides:
        cmd += ["--set", item]
    where = f" (node {args.node_rank} of {args.nnodes})" if args.nnodes > 1 else ""
    if config.dist.elastic is not None:
        span = f"{config.dist.elastic.min_nodes}..{config.dist.elastic.max_nodes}"
        where = f" (node {args.node_rank}, elastic: {span} nodes at {args.rdzv})"
    print(f"facetrain: starting {nproc} processes under torchrun{where}", flush=True)
    # A session of its own: a signal sent to this process's group (srun and slurmstepd signal
    # whole groups) must not kill the agent; it gets the stop signals from `signals` instead
    # (blocked until it takes them: the mask is inherited).
    env = dict(os.environ)
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the agent dies with this process
    if nproc > 1:  # what torchrun would set, less its banner about it on every start
        env.setdefault("OMP_NUM_THREADS", "1")
    if config.dist.elastic is not None:
        env.update(AGENT_ENV)
    told = failure.new_failure_file()
    env[failure.FAILURE_ENV] = str(told)
    agent = subprocess.Popen(cmd, start_new_session=True, env=env)
    signals.relay_to(agent.pid)
    return failure.outcome(_wait(agent), told)


def _wait(agent: subprocess.Popen[bytes]) -> int:
    """The agent's exit status. Ctrl-C reaches this process alone (the agent has a session of
    its own): it stops the run as SIGTERM does -- each rank finishes its step and saves a
    checkpoint -- and so does another Ctrl-C while the ranks stop."""
    while True:
        try:
            return agent.wait()
        except KeyboardInterrupt:
            print("facetrain: interrupted: stopping the ranks (as on SIGTERM)", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGTERM)


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.elastic import check_elastic_nodes
    from launcher.preflight import check_job_shape, check_run_inputs
    from launcher.submit import JobOptions, check_sbatch_args, render_sbatch, submit
    from trainer.config import load_config
    from trainer.plan import pack_facts, plan_run

    check_job_shape(args.nodes, args.gpus_per_node)
    check_sbatch_args(args.sbatch_args)
    budget = _gpu_mem(args)
    config = load_config(args.config, args.overrides)
    check_elastic_nodes(config, args.nodes, "--nodes")
    nproc = args.gpus_per_node or config.dist.nproc
    pack = pack_facts(config).as_dict()
    plan_run(config, nproc * args.nodes, pack)  # fail early
    check_run_inputs(config)
    job = JobOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time_limit=args.time_limit,
        account=args.account,
        qos=args.qos,
        cpus_per_task=args.cpus_per_task,
        signal_seconds=args.signal_seconds,
        sbatch_args=args.sbatch_args,
    )
    script = render_sbatch(args.config, args.overrides, config, job)
    if args.dry_run:
        from trainer.memory_report import memory_report

        print(script)
        device = "cuda" if args.gpus_per_node and config.dist.device != "cpu" else "cpu"
        report = memory_report(config, nproc * args.nodes, pack, device, budget)
        print("\n".join(f"# {line}" for line in report.splitlines()))  # the script stays valid
        return 0
    job_id = submit(script, config.run_dir.resolve())
    print(f"facetrain: submitted job {job_id}; log {config.run_dir.resolve()}/slurm-{job_id}.out")
    print(job_id)
    return 0
