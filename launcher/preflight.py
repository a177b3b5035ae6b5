"""Checks of a run's files before any process starts.

The config's validation (trainer.config) covers keys, types and registered names; what it
cannot see is on disk: the verification sets of ``data.val``, the checkpoint of
``--resume``, the weights of ``model.init_from``, whether the run folder can be written.
Each check reads (or writes) what the trainer will, and fails with a :class:`PreflightError`
naming the key and the path, which ``facetrain`` prints as one line (exit status 2) --
instead of a traceback from every rank after torchrun has started.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import Config


class PreflightError(ValueError):
    """A file the run needs is missing or unusable; the message names the key and the path."""


def check_verification_bin(path: str, what: str) -> None:
    """``path`` is an insightface ``.bin`` set whose first image decodes.

    The whole pickle is read, as the trainer reads it, so a truncated file fails here too;
    that is cheap (a 96 MB set loads in 0.05 s from the page cache; LFW is 63 MB).
    """
    from dataio.verification_bin import VerificationBinError, load_bin

    try:
        load_bin(path).image_size  # noqa: B018 - decodes image 0
    except VerificationBinError as exc:
        raise PreflightError(f"{what}: {exc}") from exc
    except (OverflowError, MemoryError) as exc:  # a corrupt length field (load_bin passes these)
        raise PreflightError(
            f"{what}: {path}: not a valid verification .bin pickle: {exc}"
        ) from exc


def check_eval_bins(paths: list[str]) -> None:
    """``facetrain eval --bin``: each path is a readable ``.bin`` set. A file of another name
    would otherwise be read as an image list (``evaluation.embed.open_image_source``)."""
    for path in paths:
        if Path(path).suffix != ".bin":
            raise PreflightError(
                f"--bin: {path}: not a verification .bin set (insightface's *.bin files)"
            )
        check_verification_bin(path, "--bin")


def check_checkpoint(path: str, what: str) -> None:
    """``path`` holds a complete checkpoint as trainer.checkpoint defines it: a ``step-N``
    folder with a readable ``meta.json``, a run folder with one, or its ``latest`` file."""
    from trainer.checkpoint import CheckpointError, read_meta, resolve_checkpoint

    if not Path(path).exists():
        raise PreflightError(f"{what}: {path}: no such checkpoint folder")
    try:
        read_meta(resolve_checkpoint(path))
    except CheckpointError as exc:
        raise PreflightError(f"{what}: {exc}") from exc


def check_job_shape(nodes: int, gpus_per_node: int) -> None:
    """``facetrain submit``: at least one node; 0 GPUs per node means CPU ranks."""
    if nodes < 1:
        raise PreflightError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise PreflightError(f"--gpus-per-node must be >= 0 (0: CPU), got {gpus_per_node}")


def check_init_from(config: Config) -> None:
    """``model.init_from``: the checkpoint or state_dict file exists and fits the configured
    backbone (keys and shapes, read on the CPU), and with ``model.init_classifier`` it is a
    checkpoint of the pack's number of classes (see trainer.init_from)."""
    if config.model.init_from is None:
        return
    from backbones.weights import WeightsError
    from trainer.checkpoint import CheckpointError
    from trainer.init_from import check_init_from as check_source
    from trainer.plan import pack_facts

    facts = pack_facts(config)
    try:
        check_source(config, facts.image_size, facts.num_classes)
    except (CheckpointError, WeightsError) as exc:
        raise PreflightError(f"model.init_from: {exc}") from exc


def check_output_dir(config: Config) -> None:
    """The run folder (``run.output_dir``/``run.name``) can be written: the folder itself if
    it exists, else the nearest folder above it (the run creates the rest). Tried by creating
    a file there: a permission check alone says yes to root on a read-only mount."""
    import tempfile

    run_dir = config.run_dir
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise PreflightError(f"run.output_dir: {existing} is not a folder (run folder {run_dir})")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise PreflightError(
            f"run.output_dir: cannot write the run folder {run_dir}: {existing}: "
            f"{exc.strerror or exc}"
        ) from exc


def check_run_inputs(config: Config) -> None:
    """The files of ``data.val``, ``run.resume`` (``--resume``) and ``model.init_from`` that
    a run will read, and the run folder it will write."""
    check_output_dir(config)
    for path in config.data.val:
        check_verification_bin(path, "data.val")
    resume = config.run.resume
    if resume is not None and resume != "auto":
        check_checkpoint(resume, "run.resume (--resume)")
        check_rollback(config)
    check_init_from(config)


def check_device(config: Config) -> None:
    """What the training step needs of the device, once ``dist.device: auto`` is resolved on
    this machine (the config's validation checks an explicit cpu)."""
    from trainer.config import check_step_device
    from trainer.memory_report import run_device

    if config.dist.device != "auto":
        return
    try:
        check_step_device(config.train, config.dist.engine, run_device(config))
    except ValueError as exc:
        raise PreflightError(f"{exc} (dist.device auto: this machine has no CUDA)") from exc


def check_rollback(config: Config) -> None:
    """``--resume`` of one of the run folder's own checkpoints while a later one is there, in
    a job whose restarts continue the folder's latest checkpoint (``dist.max_restarts``,
    ``dist.elastic``: :func:`trainer.resume.continue_run`): refused, since the first restart
    (an elastic job: every start) would jump to the later checkpoint the user meant to leave."""
    from trainer.checkpoint import resolve_checkpoint, step_dirs

    elastic = config.dist.elastic is not None
    if not elastic and config.dist.max_restarts == 0:
        return
    chosen = resolve_checkpoint(str(config.run.resume)).resolve()  # checked readable above
    steps = step_dirs(config.run_dir)
    if chosen.parent != config.run_dir.resolve() or not steps:
        return
    latest = steps[-1][1]
    if latest.resolve() == chosen:
        return
    why = "dist.elastic" if elastic else f"dist.max_restarts={config.dist.max_restarts}"
    raise PreflightError(
        f"run.resume (--resume): {config.run.resume} is not the latest checkpoint of its run "
        f"folder ({latest.name}); with {why} the job continues the folder's latest checkpoint "
        f"when it restarts: resume into a new run.name (--set run.name=...) to go back"
    )
