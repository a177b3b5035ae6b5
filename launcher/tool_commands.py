"""The tool commands of ``facetrain``: data (synth, pack, inspect) and models (eval, embed,
export, plots, heads). Each is a thin function from parsed arguments to a library call and a
printed summary; the work is done in :mod:`dataio`, :mod:`evaluation`, :mod:`launcher.tools`
and :mod:`partialfc.registry`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(ValueError):
    """Arguments that parse but do not make sense together."""


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

    if args.grid:  # first: drawing a few images is quick, checking every record is not
        from dataio.inspect_grid import write_grid

        grid = write_grid(args.pack_dir, args.grid, args.grid_rows, args.grid_cols, args.seed)
        print(f"grid: {grid.rows} identities x {grid.cols} images -> {grid.path}")
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
    from launcher.tools import describe_model, eval_settings, make_embedder

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
    embedder, input_size = make_embedder(args.model, args.backbone, args.embedding_size)
    for key, value in eval_settings(args.model).items():  # the checkpoint's eval settings
        if getattr(args, key) is None:
            setattr(args, key, value)
    for path in [*args.bin, *([args.probes, args.distractors] if args.probes else [])]:
        check_image_size(open_image_source(path), path, input_size, args.model)
    common = {"batch_size": args.batch_size, "flip": not args.no_flip}
    model = describe_model(args.model, args.backbone) if args.plots else None
    results: dict[str, object] = {}
    if args.bin:
        ver = runner.run_verification(
            embedder, args.bin, nfolds=args.nfolds, plots_dir=args.plots, model=model, **common
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
            model=model,
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
    from launcher.tools import make_embedder

    embedder, input_size = make_embedder(args.model, args.backbone, args.embedding_size)
    res = embed_to_npy(
        embedder,
        args.images,
        args.out,
        args.batch_size,
        flip=args.flip,
        input_size=input_size,
        name=args.model,
    )
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
        backbone=args.backbone,
        embedding_size=args.embedding_size,
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
    """``--run``: the run's curves (toy figures too when ``--heads`` is given); else the toy
    figures of every head."""
    if args.run:
        from evaluation.run_plots import plot_run

        for name, path in plot_run(args.run, args.out or Path(args.run) / "plots").items():
            print(f"{name:<16} -> {path}")
        if args.heads is None:
            return 0
    from evaluation.toy_plots import make_toy_plots

    res = make_toy_plots(args.out or "docs/figures", args.heads, steps=args.steps, seed=args.seed)
    for name, path in res.files.items():
        print(f"{name:<16} toy test accuracy {100 * res.accuracy[name]:5.1f}%  -> {path}")
    for name, reason in res.skipped.items():
        print(f"{name:<16} skipped: {reason}")
    return 0 if res.files else 1


def cmd_heads(args: argparse.Namespace) -> int:
    from partialfc.registry import describe_head, reference_markdown

    print(describe_head(args.name) if args.name else reference_markdown())
    return 0
