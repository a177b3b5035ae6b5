"""``facetrain``: the command-line entry point.

Subcommands: train, submit, synth, pack, inspect, eval, embed, export, plots, heads. ``train``
validates the config and the pack before any process starts; when it is not already running
under a launcher (torchrun, the DeepSpeed launcher, srun) and more than one process is asked
for, it starts torchrun itself.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from launcher import env as launch_env

if TYPE_CHECKING:
    from trainer.config import Config


class UsageError(ValueError):
    """Arguments that parse but do not make sense together."""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optimizer.lr=0.05 (repeatable)",
    )
    p.add_argument("--nproc", type=int, default=None, help="processes on this node (dist.nproc)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes in the job (one agent each)")
    p.add_argument("--node-rank", type=int, default=0, help="this node's rank in [0, nnodes)")
    p.add_argument(
        "--rdzv", default=None, metavar="HOST:PORT", help="rendezvous endpoint (first node)"
    )
    p.add_argument("--engine", choices=["ddp", "deepspeed"], default=None, help="dist.engine")
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="auto: continue from the run's latest complete checkpoint; or a checkpoint path",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate, print the resolved plan and exit"
    )


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic identity dataset (pack + val.bin)")
    p.add_argument("--identities", type=int, required=True, help="training identities")
    p.add_argument("--images-per-id", type=int, required=True, help="images per identity")
    p.add_argument("--val-identities", type=int, default=200, help="held-out identities")
    p.add_argument("--val-images-per-id", type=int, default=10)
    p.add_argument("--val-pairs", type=int, default=3000, help="verification pairs (even)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", required=True, help="output folder (train/ and val.bin)")


def _add_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack an image folder (a folder per identity) as RecordIO")
    p.add_argument("image_dir", help="folder of identity folders, or a list file 'path label'")
    p.add_argument("--out", required=True, help="output folder (train.rec, train.idx, property)")
    p.add_argument("--shuffle", action="store_true", help="shuffle images within identities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--align",
        action="store_true",
        help="crop every image onto the ArcFace template from its 5 landmarks (list file)",
    )
    p.add_argument(
        "--align-size",
        type=int,
        nargs=2,
        default=(112, 112),
        metavar=("H", "W"),
        help="aligned crop size: 112 112 or 112 96",
    )
    p.add_argument(
        "--no-header",
        action="store_true",
        help="plain layout (scalar labels, no header/identity records) instead of insightface's",
    )


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a pack and decode-check every record")
    p.add_argument("pack_dir", help="folder with train.rec, train.idx, property")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode threads")
    p.add_argument("--json", default=None, help="also write the report to this JSON file")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="verification (.bin), IJB-B/C and identification of a checkpoint or ONNX"
    )
    p.add_argument("model", help="checkpoint (step-N folder or run folder) or .onnx file")
    p.add_argument("--bin", nargs="+", default=[], help="insightface .bin verification sets")
    p.add_argument("--ijb", default=None, metavar="ROOT", help="IJB-B/C release folder")
    p.add_argument("--ijb-name", default="IJBC", help="IJBB or IJBC (file prefix in ROOT/meta)")
    p.add_argument("--probes", default=None, help="identification: probe images (pack/folder)")
    p.add_argument("--distractors", default=None, help="identification: distractor images")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 5, 10], help="rank-k to report")
    p.add_argument("--batch-size", type=int, default=None, help="default: as in training")
    p.add_argument("--nfolds", type=int, default=None, help="default: as in training")
    p.add_argument("--no-flip", action="store_true", help="skip the flipped image's embedding")
    p.add_argument("--plots", default=None, metavar="DIR", help="write ROC / angle figures here")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="L2-normalised embeddings of images with an ONNX model")
    p.add_argument("model", help=".onnx file")
    p.add_argument("images", help="image folder, list file, pack folder or .bin set")
    p.add_argument("--out", required=True, help="output .npy (a .tsv index is written beside)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--flip", action="store_true", help="add the flipped image's embedding")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint's backbone to ONNX (parity-checked)")
    p.add_argument("checkpoint", help="step-N folder or run folder")
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--simplify", action="store_true", help="run onnxsim on the graph")
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 input/output")
    p.add_argument("--fp16-tolerance", type=float, default=1e-2)


def _add_plots(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plots", help="2-D toy figures of every margin head; a run's angle history")
    p.add_argument("--out", default="docs/figures", help="output folder")
    p.add_argument("--heads", nargs="*", default=None, help="default: softmax + every head")
    p.add_argument("--steps", type=int, default=300, help="toy training steps per head")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--run", default=None, help="also plot the target angle history of this wandb run folder"
    )


def _add_heads(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="the margin heads and auxiliary losses, or one head's fields")
    p.add_argument("name", nargs="?", default=None, help="a head: its fields, defaults, bounds")


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="render the sbatch script for a config and submit it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: CPU (dist.nproc ranks)")
    p.add_argument("--partition")
    p.add_argument("--time", dest="time_limit", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before the end")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facetrain", description="distributed face-recognition training and its tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_submit,
        _add_synth,
        _add_pack,
        _add_inspect,
        _add_eval,
        _add_embed,
        _add_export,
        _add_plots,
        _add_heads,
    ):
        add(sub)
    return parser


# ------------------------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> int:
    from launcher.preflight import check_run_inputs
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
    config = load_config(args.config, overrides)  # fails here, before any process starts
    world = launch_env.planned_world_size(config.dist.nproc, args.nnodes)
    plan = plan_run(config, world, pack_facts(config).as_dict())
    check_run_inputs(config)  # data.val and --resume, read as the trainer will read them
    if args.dry_run:
        print(dump_config(config))
        print(format_plan(plan))
        return 0
    if launch_env.under_launcher() or (config.dist.nproc == 1 and args.nnodes == 1):
        from launcher.worker import run_worker

        # One rank of srun / torchrun / deepspeed leaves its process group to the process
        # exit (see entry); a single process run in-process tears it down.
        run_worker(config, keep_group=launch_env.under_launcher())
        return 0
    return _spawn_torchrun(args, overrides, config)


def _spawn_torchrun(args: argparse.Namespace, overrides: list[str], config: Config) -> int:
    """Start ``dist.nproc`` workers on this node under torchrun's elastic agent: standalone
    on one node, or one agent per node meeting at the ``--rdzv`` endpoint (c10d).

    SIGTERM / SIGUSR1 sent to this process are passed on to the workers as SIGUSR1 (each
    finishes its step, checkpoints and exits 0), not to the agent, which would kill them.
    """
    nproc = config.dist.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if args.nnodes == 1:
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
        "-m",
        "launcher.worker",
        args.config,
    ]
    for item in overrides:
        cmd += ["--set", item]
    where = f" (node {args.node_rank} of {args.nnodes})" if args.nnodes > 1 else ""
    print(f"facetrain: starting {nproc} processes under torchrun{where}", flush=True)
    # A session of its own: a signal sent to this process's group (srun and slurmstepd signal
    # whole groups) must not kill the agent; the workers get it from `forward` instead.
    agent = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: object) -> None:
        for pid in _workers(agent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return agent.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _workers(pid: int) -> list[int]:
    """The training workers: the torchrun agent's direct children (not their DataLoader
    workers, which a SIGUSR1 would kill)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def cmd_submit(args: argparse.Namespace) -> int:
    from launcher.preflight import check_job_shape, check_run_inputs
    from launcher.submit import render_sbatch, submit
    from trainer.config import load_config
    from trainer.plan import pack_facts, plan_run

    check_job_shape(args.nodes, args.gpus_per_node)
    config = load_config(args.config, args.overrides)
    nproc = args.gpus_per_node or config.dist.nproc
    plan_run(config, nproc * args.nodes, pack_facts(config).as_dict())  # fail early
    check_run_inputs(config)
    script = render_sbatch(
        args.config,
        args.overrides,
        config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        partition=args.partition,
        time_limit=args.time_limit,
        account=args.account,
        qos=args.qos,
        cpus_per_task=args.cpus_per_task,
        signal_seconds=args.signal_seconds,
    )
    if args.dry_run:
        print(script)
        return 0
    job = submit(script, config.run_dir.resolve())
    print(f"facetrain: submitted job {job}; log {config.run_dir.resolve()}/slurm-{job}.out")
    print(job)
    return 0


# ------------------------------------------------------------------------------- data tools
def cmd_synth(args: argparse.Namespace) -> int:
    from dataio.synth import write_synthetic_dataset

    info = write_synthetic_dataset(
        args.out,
        identities=args.identities,
        images_per_id=args.images_per_id,
        val_identities=args.val_identities,
        val_images_per_id=args.val_images_per_id,
        val_pairs=args.val_pairs,
        seed=args.seed,
        workers=args.workers,
    )
    print(
        f"synth: {info.num_images} images of {info.num_classes} identities -> {info.train_dir}; "
        f"{info.num_val_pairs} held-out pairs -> {info.val_path}"
    )
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from dataio.packer import pack_image_folder

    info = pack_image_folder(
        args.image_dir,
        args.out,
        shuffle=args.shuffle,
        seed=args.seed,
        workers=args.workers,
        with_header=not args.no_header,
        align=args.align,
        align_size=tuple(args.align_size),
    )
    print(
        f"pack: {info.num_images} images of {info.num_classes} identities, "
        f"{info.image_size[0]}x{info.image_size[1]} -> {info.out_dir}"
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from dataio.inspect_pack import format_report, inspect_pack
    from evaluation.runner import write_json

    report = inspect_pack(args.pack_dir, workers=args.workers)
    print(format_report(report))
    if args.json:
        write_json(report.to_dict(), args.json)
    return 0 if report.ok else 1


# ------------------------------------------------------------------------------ eval/export
def cmd_eval(args: argparse.Namespace) -> int:
    from evaluation import runner
    from evaluation.embed import check_image_size, open_image_source
    from launcher.preflight import check_eval_bins
    from launcher.tools import eval_settings, make_embedder

    if not (args.bin or args.ijb or args.probes):
        raise UsageError("nothing to evaluate; give --bin, --ijb or --probes/--distractors")
    if bool(args.probes) != bool(args.distractors):
        raise UsageError("identification needs both --probes and --distractors")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--nfolds", args.nfolds, 2)):
        if value is not None and value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if args.probes and min(args.ranks) < 1:
        raise UsageError(f"--ranks must be >= 1, got {args.ranks}")
    check_eval_bins(args.bin)
    embedder, input_size = make_embedder(args.model)
    for key, value in eval_settings(args.model).items():  # the checkpoint's eval settings
        if getattr(args, key) is None:
            setattr(args, key, value)
    for path in [*args.bin, *([args.probes, args.distractors] if args.probes else [])]:
        check_image_size(open_image_source(path), path, input_size, args.model)
    common = {"batch_size": args.batch_size, "flip": not args.no_flip}
    results: dict[str, object] = {}
    if args.bin:
        ver = runner.run_verification(
            embedder, args.bin, nfolds=args.nfolds, plots_dir=args.plots, **common
        )
        print(runner.format_verification_table(ver))
        results["verification"] = ver
    if args.ijb:
        ijb = runner.run_ijb(
            embedder,
            args.ijb,
            args.ijb_name,
            input_size=input_size or (112, 112),
            plots_dir=args.plots,
            **common,
        )
        print(runner.format_ijb_table(ijb))
        results["ijb"] = ijb
    if args.probes:
        ident = runner.run_identification(
            embedder, args.probes, args.distractors, ranks=args.ranks, **common
        )
        print(runner.format_identification_table(ident))
        results["identification"] = ident
    if args.json:
        runner.write_json(results, args.json)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from evaluation.embed import embed_to_npy

    res = embed_to_npy(args.model, args.images, args.out, args.batch_size, flip=args.flip)
    print(f"embed: {res.num_images} x {res.dim} -> {res.path} (index {res.index_path})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launcher.tools import export_checkpoint

    res = export_checkpoint(
        args.checkpoint,
        args.out,
        args.opset,
        args.tolerance,
        simplify=args.simplify,
        fp16=args.fp16,
        fp16_tolerance=args.fp16_tolerance,
    )
    kind = " fp16" if res.fp16 else ""
    kind += " simplified" if res.simplified else ""
    if res.opset != args.opset:
        kind += f"; {args.opset} was asked for, the version converter could not reach it"
    print(
        f"export: {res.path} (opset {res.opset}{kind}), "
        f"max |onnxruntime - torch| = {res.max_abs_diff:.2e}"
    )
    return 0


def cmd_plots(args: argparse.Namespace) -> int:
    from evaluation.plots import load_history, plot_target_angle_history
    from evaluation.toy_plots import make_toy_plots

    res = make_toy_plots(args.out, args.heads, steps=args.steps, seed=args.seed)
    for name, path in res.files.items():
        print(f"{name:<16} toy test accuracy {100 * res.accuracy[name]:5.1f}%  -> {path}")
    for name, reason in res.skipped.items():
        print(f"{name:<16} skipped: {reason}")
    if args.run:
        path = plot_target_angle_history(load_history(args.run), Path(args.out) / "angles.png")
        print(f"target angle history -> {path}")
    return 0 if res.files else 1


def cmd_heads(args: argparse.Namespace) -> int:
    from partialfc.registry import describe_head, reference_markdown

    print(describe_head(args.name) if args.name else reference_markdown())
    return 0


_COMMANDS = {
    "train": cmd_train,
    "submit": cmd_submit,
    "synth": cmd_synth,
    "pack": cmd_pack,
    "inspect": cmd_inspect,
    "eval": cmd_eval,
    "embed": cmd_embed,
    "export": cmd_export,
    "plots": cmd_plots,
    "heads": cmd_heads,
}


def main(argv: list[str] | None = None) -> int:
    from evaluation.onnx_export import OnnxParityError
    from launcher.submit import SubmitError
    from trainer.checkpoint import CheckpointError

    # ValueError covers the project's input errors (ConfigError, PackError, RecordIOError,
    # VerificationBinError, AlignmentError, EmbeddingError, IJBError, UsageError) and the
    # argument checks of every package: each message names the key, file or argument, so a
    # traceback would add nothing for the user.
    user_errors = (
        ValueError,
        OnnxParityError,
        CheckpointError,
        SubmitError,
        FileNotFoundError,
    )
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except user_errors as exc:
        print(f"facetrain {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``facetrain`` console script: ``main``, then exit. A process whose process group
    is still alive (a launcher's rank after training, see ``run_worker``) ends with
    ``launcher.worker.exit_process``: no interpreter or process group teardown. In-process
    callers of ``main`` are never ended."""
    code = main()
    if launch_env.has_process_group():
        from launcher.worker import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
