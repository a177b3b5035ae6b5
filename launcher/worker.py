"""One training process: environment -> DistContext -> process group -> Trainer.

Run by ``facetrain train`` directly (one process) or as ``python -m launcher.worker CONFIG``
by torchrun / srun for each rank.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any

from launcher import env as launch_env
from launcher import failure
from launcher.lifeline import rank_lifeline
from trainer.config import Config, load_config
from trainer.loop import Trainer
from trainer.resume import continue_run
from trainer.run_log import run_counts
from trainer.stop import StopFlag


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's closing report: what training bought, and where the artifacts are."""
    lines = ["", "=" * 72, "facetrain summary", "=" * 72]
    d = summary.get("derived", {})
    t = summary.get("train", {})
    world = max(d.get("world_size", 1), 1)
    lines.append(
        f"data      : {d.get('num_images')} images, {d.get('num_classes')} classes; "
        f"{world} ranks x batch {d.get('global_batch_size', 0) // world}"
    )
    if t:
        loss = t.get("final_loss")
        loss_text = "n/a" if loss is None else f"{loss:.4f}"
        lines.append(f"training  : {run_counts(t)}, final loss {loss_text}")
    if summary.get("resumed_from"):
        lines.append(f"resumed   : from {summary['resumed_from']}")
    before = summary.get("eval_before", {})
    after = summary.get("eval_after", {})
    baseline = summary.get("pixel_baseline", {})
    for name, res in after.items():
        lines.append(f"verification on held-out '{name}' (10-fold accuracy):")
        if name in baseline:
            lines.append(f"  raw-pixel cosine baseline : {100 * baseline[name]:6.2f}%")
        if name in before:
            lines.append(f"  before training (random)  : {100 * before[name]['accuracy']:6.2f}%")
        lines.append(
            f"  after training            : {100 * res['accuracy']:6.2f}% "
            f"+- {100 * res['accuracy_std']:.2f}   (VAL@FAR=1e-3 {res['val_at_far_1e-3']:.4f})"
        )
    onnx = summary.get("onnx")
    if onnx:
        lines.append(
            f"onnx      : {onnx['path']} (opset {onnx['opset']}), "
            f"max |onnxruntime - torch| = {onnx['max_abs_diff']:.2e}"
        )
    lines.append(f"checkpoint: {summary.get('checkpoint')}")
    lines.append(f"wandb run : {summary.get('wandb_run')}")
    lines.append("=" * 72)
    return "\n".join(lines)


def run_worker(
    config: Config, keep_group: bool = False, stop: StopFlag | None = None
) -> dict[str, Any]:
    """Train on this process's rank; rank 0 prints the summary.

    ``stop``: raised by the caller's stop signals (``launcher.lifeline``): the run stops
    cleanly, with a checkpoint if it trained since the last one.

    ``keep_group=True``: after a successful run the process group is left as it is, for a
    caller that ends the process right away with ``exit_process`` (a launcher's rank):
    ``destroy_process_group`` right after the final barrier has aborted a finished gloo rank
    now and then (SIGABRT in gloo's destructors, "terminate called without an active
    exception"), failing a complete torchrun or Slurm job. After an error the group is
    always destroyed.
    """
    if launch_env.restart_count() > 0 or config.dist.elastic is not None:
        # torchrun restarted us after a failure, or an elastic job's nodes changed (a
        # restart its count leaves out): continue from the run's latest checkpoint.
        config = continue_run(config)
    ctx = launch_env.dist_context_from_env(config.dist.device, config.dist.backend)
    if config.dist.engine == "deepspeed":
        launch_env.prepare_deepspeed(ctx)
    if config.train.compile:
        launch_env.compile_cache_dir()  # compiled kernels reused by the next start
    stop = stop or StopFlag()
    launch_env.init_process_group(
        ctx, config.dist.timeout_s, one_rank_group=config.dist.engine == "deepspeed"
    )
    try:
        summary = Trainer(config, ctx, stop).fit()
        # Leave together: a rank that tears its process group down while rank 0 is still
        # exporting can abort in gloo's destructors and fail the whole job.
        launch_env.barrier()
        if ctx.is_main:
            if "stopped" in summary:
                saved = summary.get("checkpoint")  # none: stopped before it trained a step
                then = "nothing to checkpoint"
                if saved:
                    then = f"checkpoint {saved}; resume with --resume auto"
                print(f"facetrain: {summary['stopped']}; {then}", flush=True)
            else:
                print(format_summary(summary), flush=True)
    except BaseException as exc:
        if isinstance(exc, failure.user_errors()):
            failure.tell(exc)  # before the group goes: the other ranks' errors follow from it
        launch_env.destroy_process_group()
        raise
    if not keep_group:
        launch_env.destroy_process_group()
    return summary


def exit_process(code: int) -> None:
    """End this rank's process now, without the interpreter's teardown.

    Everything is written and closed by then (checkpoint, ONNX, wandb). C++ destructors of
    gloo and DataLoader threads running in an arbitrary order at interpreter exit have
    aborted finished ranks ("terminate called without an active exception"), turning a
    complete run into a failed torchrun or Slurm job; the OS closes the sockets instead.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # A closed stdout or a broken pipe must not turn a finished run into a traceback.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def main(
    argv: list[str] | None = None, keep_group: bool = False, stop: StopFlag | None = None
) -> int:
    """``python -m launcher.worker CONFIG [--set K=V ...] [--resume R]``; ``keep_group``,
    ``stop``: see ``run_worker`` (the module's ``__main__`` sets them and ends the process
    itself)."""
    parser = argparse.ArgumentParser(prog="launcher.worker")
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    run_worker(load_config(args.config, overrides), keep_group=keep_group, stop=stop)
    return 0


def rank_main(stop: StopFlag | None = None) -> int:
    """A rank started by torchrun or srun: :func:`main`; a user error is told in one line,
    and an error that follows from another rank's told failure (a collective whose peer has
    gone) is not told again (:mod:`launcher.failure`). A told failure is final: a rank that
    torchrun restarts after one ends at once."""
    if failure.told():
        # torchrun restarted the ranks after a rank had told its failure: a user error (a
        # corrupt record, a full disk, weights gone non-finite) comes back on every restart,
        # so the run ends now, with that line (the restarts left end the same way, at once).
        return failure.EXIT_CODE
    try:
        return main(keep_group=True, stop=stop)
    except failure.user_errors() as exc:
        return failure.report(exc)
    except Exception:
        if failure.told():
            return failure.EXIT_CODE
        raise


if __name__ == "__main__":
    exit_process(rank_main(rank_lifeline()))  # rank_lifeline: launcher.lifeline
