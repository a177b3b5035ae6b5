"""``facetrain``: the command-line entry point.

Subcommands: train, submit, synth, pack, inspect, eval, embed, export, plots, heads, runs.
``train`` validates the config and the pack before any process starts; when it is not already
running under a launcher (torchrun, the DeepSpeed launcher, srun) and more than one process is
asked for, it starts torchrun itself.

This module holds the argument parsers and the dispatch (:func:`main`, the console script
:func:`entry`); the commands are :mod:`launcher.train_commands` (train, submit),
:mod:`launcher.tool_commands` (the data and model tools) and :mod:`launcher.runs` (runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _positive_int(text: str) -> int:
    """An argument that counts something (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


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
        "--dry-run",
        action="store_true",
        help="validate, print the resolved plan and the memory per rank, and exit",
    )
    _add_gpu_mem(p)


def _add_gpu_mem(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu-mem",
        default=None,
        metavar="SIZE",
        help="with --dry-run: memory per GPU (per rank's RSS on CPU), e.g. 80GB (10^9 bytes) "
        "or 80GiB / 80G (2^30): does the run fit, the largest class count and sample rate "
        "that do",
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
    p.add_argument("--grid", default=None, metavar="PNG", help="save a sheet of sample images")
    p.add_argument(
        "--grid-rows", type=_positive_int, default=8, help="identities on the sheet (rows)"
    )
    p.add_argument("--grid-cols", type=_positive_int, default=8, help="images of each identity")
    p.add_argument("--seed", type=int, default=0, help="which identities and images are drawn")


def _add_architecture(p: argparse.ArgumentParser) -> None:
    """--backbone / --embedding-size: the network of a state_dict file (e.g. arcface_torch's)."""
    p.add_argument(
        "--backbone",
        default=None,
        metavar="NAME",
        help="MODEL is a state_dict file (torch.save(backbone.state_dict())) of this backbone",
    )
    p.add_argument(
        "--embedding-size", type=int, default=None, help="of the state_dict's backbone (512)"
    )


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="verification (.bin), IJB-B/C and identification of a checkpoint or ONNX"
    )
    p.add_argument("model", help="checkpoint (step-N or run folder), .onnx or state_dict file")
    _add_architecture(p)
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
    p = sub.add_parser("embed", help="L2-normalised embeddings of images with a model")
    p.add_argument("model", help="checkpoint (step-N or run folder), .onnx or state_dict file")
    _add_architecture(p)
    p.add_argument("images", help="image folder, list file, pack folder or .bin set")
    p.add_argument("--out", required=True, help="output .npy (a .tsv index is written beside)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--flip", action="store_true", help="add the flipped image's embedding")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint's backbone to ONNX (parity-checked)")
    p.add_argument("checkpoint", help="step-N folder, run folder or state_dict file")
    _add_architecture(p)
    p.add_argument("--out", required=True, help="output .onnx path")
    p.add_argument("--opset", type=int, default=18, help="17 for runtimes that stop there")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--simplify", action="store_true", help="run onnxsim on the graph")
    p.add_argument("--fp16", action="store_true", help="float16 weights, float32 input/output")
    p.add_argument("--fp16-tolerance", type=float, default=1e-2)


def _add_plots(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plots", help="a run's curves (--run), or 2-D toy figures of the heads")
    p.add_argument(
        "--run",
        default=None,
        help="run folder (output/NAME): loss, lr, eval accuracy and angles against the step",
    )
    p.add_argument("--out", default=None, help="output folder (RUN/plots, or docs/figures)")
    p.add_argument("--heads", nargs="*", default=None, help="toy figures of these heads")
    p.add_argument("--steps", type=int, default=300, help="toy training steps per head")
    p.add_argument("--seed", type=int, default=0)


def _add_heads(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="the margin heads and auxiliary losses, or one head's fields")
    p.add_argument("name", nargs="?", default=None, help="a head: its fields, defaults, bounds")


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="the runs of an output folder: step, loss, accuracy, state")
    p.add_argument("output_dir", nargs="?", default="output", help="run.output_dir (output)")


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="render the sbatch script for a config and submit it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: CPU (dist.nproc ranks)")
    p.add_argument("--partition")
    p.add_argument("--time", dest="time_limit", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus-per-task", type=int, help="default: ranks per node x (workers + 1)")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="USR1 (checkpoint, requeue) this long before the time limit; 0: none",
    )
    p.add_argument(
        "--sbatch-arg",
        dest="sbatch_args",
        action="append",
        default=[],
        metavar="OPTION",
        help="any other sbatch option, e.g. --sbatch-arg=--exclusive --sbatch-arg=--mem=64G",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the script and the memory per rank (as # lines), submit nothing",
    )
    _add_gpu_mem(p)


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
        _add_runs,
    ):
        add(sub)
    return parser


# The module of each command's ``cmd_NAME``, imported only when that command runs: building
# the parsers imports no torch, so ``facetrain --help`` and ``facetrain CMD --help`` are quick.
_TRAIN, _TOOLS = "launcher.train_commands", "launcher.tool_commands"
_COMMANDS = {
    "train": _TRAIN,
    "submit": _TRAIN,
    "synth": _TOOLS,
    "pack": _TOOLS,
    "inspect": _TOOLS,
    "eval": _TOOLS,
    "embed": _TOOLS,
    "export": _TOOLS,
    "plots": _TOOLS,
    "heads": _TOOLS,
    "runs": "launcher.runs",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = getattr(importlib.import_module(_COMMANDS[args.command]), f"cmd_{args.command}")

    from launcher import failure

    # The project's input errors (ConfigError, PackError, RecordIOError, VerificationBinError,
    # AlignmentError, EmbeddingError, IJBError, UsageError, ...; launcher.failure.user_errors):
    # each message names the key, file or argument, so a traceback would add nothing.
    try:
        return command(args)
    except failure.user_errors() as exc:
        print(failure.error_line(args.command, exc), file=sys.stderr)
        return failure.EXIT_CODE


def entry() -> None:
    """The ``facetrain`` console script: ``main``, then exit. A process whose process group
    is still alive (a launcher's rank after training, see ``run_worker``) ends with
    ``launcher.worker.exit_process``: no interpreter or process group teardown. In-process
    callers of ``main`` are never ended."""
    code = main()
    from launcher import env as launch_env

    if launch_env.has_process_group():
        from launcher.worker import exit_process

        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
