"""Data I/O throughput: DALI CPU pipeline and PyTorch loader vs the raw JPEG decode rate.

Usage::

    .venv/bin/python bench/dataio_bench.py [--pack DIR] [--images 3000] [--workers 2]
        [--batch-size 128] [--repeats 3] [--epochs 2] [--json bench/results/dataio_bench.json]

Without ``--pack`` it renders a synthetic face pack (``dataio.synth``, 112x112 JPEGs) into a
temporary folder. Each repeat measures, back to back on the same images:

* raw decode: ``simplejpeg.decode_jpeg`` (libjpeg-turbo) of the pack's JPEG bytes, already in
  memory, on ``--workers`` threads (the decoder releases the GIL) -- the ceiling a loader on
  that many cores could reach if it did nothing but decode;
* DALI's reader + decoder alone (uint8 out), to separate decoding from the rest;
* the DALI loader on the CPU (``num_threads = --workers``) and the PyTorch loader
  (``--workers`` worker processes), each for ``--epochs`` whole epochs at ``--batch-size``,
  flip on, in both pixel formats: uint8 ``[B, H, W, 3]`` batches (decoded, flipped, labels
  checked -- what the trainer takes) and normalised float32 ``[B, 3, H, W]`` batches;
* the normalisation the trainer then does (``dataio.loading.to_model_input``, uint8 ->
  float32 on one CPU thread; on a GPU it runs on the device), so its cost is on the table too.

It prints a table of the medians over repeats (and each loader's ratio to the raw rate
measured in the same repeat) and writes them with the per-repeat figures as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import simplejpeg
import torch
from _measure import write_result  # bench/ is sys.path[0] when a bench runs


def make_pack(root: str, images: int, seed: int) -> str:
    """Render a synthetic face pack of about ``images`` 112x112 images; return its folder."""
    from dataio.synth import write_synthetic_dataset

    per_id = 20
    write_synthetic_dataset(
        root,
        identities=max(1, images // per_id),
        images_per_id=per_id,
        val_identities=4,
        val_images_per_id=2,
        val_pairs=4,
        seed=seed,
        workers=2,
        progress=False,
    )
    return os.path.join(root, "train")


def raw_decode_rate(jpegs: list[bytes], threads: int) -> float:
    """Images per second decoding ``jpegs`` to RGB with ``threads`` threads."""
    chunks = [jpegs[i::threads] for i in range(threads)]

    def work(chunk: list[bytes]) -> int:
        for data in chunk:
            simplejpeg.decode_jpeg(data, colorspace="RGB")
        return len(chunk)

    start = time.perf_counter()
    if threads == 1:
        n = work(jpegs)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            n = sum(pool.map(work, chunks))
    return n / (time.perf_counter() - start)


def dali_decode_only_rate(
    pack: Any, cache_dir: str, batch_size: int, threads: int, batches: int
) -> float:
    """Images per second of DALI's mxnet reader + CPU decoder alone (uint8 out, no
    normalisation, no checks): what the loader's pipeline costs before its float output."""
    from nvidia.dali import fn, pipeline_def, types

    from dataio.dali_index import image_index_path

    index = image_index_path(pack, np.arange(pack.num_images), cache_dir)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=None, seed=1)
    def pipeline() -> Any:
        jpegs, labels = fn.readers.mxnet(
            path=[pack.rec_path], index_path=[index], random_shuffle=True, initial_fill=1024
        )
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB), labels

    pipe = pipeline()
    pipe.build()
    for _ in range(2):
        pipe.run()
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = pipe.run()
        images.as_array()
    rate = batches * batch_size / (time.perf_counter() - start)
    del pipe
    return rate


def loader_rate(loader: Any, epochs: int, first_epoch: int) -> float:
    """Images per second over ``epochs`` whole epochs (set_epoch and start-up included)."""
    count = 0
    start = time.perf_counter()
    for e in range(first_epoch, first_epoch + epochs):
        loader.set_epoch(e)
        for images, _labels in loader:
            count += images.shape[0]
    return count / (time.perf_counter() - start)


def normalise_rate(pack: Any, batch_size: int, repeats: int = 20) -> float:
    """Images per second of ``to_model_input`` on uint8 ``[B, H, W, 3]`` batches, one thread."""
    from dataio.loading import to_model_input

    h, w = pack.image_size
    x = torch.randint(0, 256, (batch_size, h, w, 3), dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        to_model_input(x, "cpu")
        start = time.perf_counter()
        for _ in range(repeats):
            to_model_input(x, "cpu")
        return repeats * batch_size / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", help="an existing pack folder (default: render one)")
    parser.add_argument("--images", type=int, default=3000, help="images to render")
    parser.add_argument("--workers", type=int, default=2, help="threads / worker processes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per loader measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/results/dataio_bench.json")
    args = parser.parse_args(argv)

    from dataio.loaders import DaliOptions, LoaderConfig, build_loader
    from dataio.pack import FacePack

    with tempfile.TemporaryDirectory() as tmp:
        pack_dir = args.pack or make_pack(tmp, args.images, args.seed)
        pack = FacePack(pack_dir)
        jpegs = [pack.read(i)[0] for i in range(pack.num_images)]
        cache = os.path.join(tmp, "cache")
        loaders = {
            f"{kind}_{pixels}": build_loader(
                kind,
                pack_dir,
                LoaderConfig(
                    batch_size=args.batch_size,
                    seed=args.seed,
                    workers=args.workers,
                    flip=True,
                    pixels=pixels,
                    dali=DaliOptions(cache_dir=cache),
                ),
                rank=0,
                world_size=1,
            )
            for kind in ("dali", "torch")
            for pixels in ("uint8", "float32")
        }
        # Warm-up: page cache, worker start-up, DALI plugin load.
        raw_decode_rate(jpegs, args.workers)
        for loader in loaders.values():
            loader_rate(loader, 1, 0)
        runs: list[dict[str, float]] = []
        for rep in range(args.repeats):
            first = 1 + rep * args.epochs
            run = {
                "raw_decode_1thread": raw_decode_rate(jpegs, 1),
                "raw_decode": raw_decode_rate(jpegs, args.workers),
                "dali_decode_only": dali_decode_only_rate(
                    pack,
                    os.path.join(tmp, "cache"),
                    args.batch_size,
                    args.workers,
                    max(1, pack.num_images // args.batch_size),
                ),
                **{
                    name: loader_rate(loader, args.epochs, first)
                    for name, loader in loaders.items()
                },
                "normalise": normalise_rate(pack, args.batch_size),
            }
            run["raw_decode_after"] = raw_decode_rate(jpegs, args.workers)
            raw = (run["raw_decode"] + run["raw_decode_after"]) / 2
            for name in ("dali_decode_only", *loaders):
                run[f"{name}_ratio"] = run[name] / raw
            runs.append(run)
            print(
                f"repeat {rep + 1}/{args.repeats}: "
                + ", ".join(f"{k} {v:.2f}" for k, v in run.items())
            )
        info = pack.info()
        mean_bytes = float(np.mean([len(j) for j in jpegs]))

    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rows = [
        ("raw JPEG decode, 1 thread (simplejpeg)", median["raw_decode_1thread"], None),
        (f"raw JPEG decode, {args.workers} threads (simplejpeg)", median["raw_decode"], 1.0),
        (
            f"DALI reader+decoder only, {args.workers} threads",
            median["dali_decode_only"],
            median["dali_decode_only_ratio"],
        ),
        *(
            (
                f"{label}, {pixels} out",
                median[f"{kind}_{pixels}"],
                median[f"{kind}_{pixels}_ratio"],
            )
            for kind, label in (
                ("dali", f"DALI CPU loader, {args.workers} threads"),
                ("torch", f"PyTorch loader, {args.workers} workers"),
            )
            for pixels in ("uint8", "float32")
        ),
        ("uint8 -> float32 normalise (to_model_input), 1 thread", median["normalise"], None),
    ]
    h, w = info.image_size
    print(
        f"\n{info.num_images} images {h}x{w}, {mean_bytes / 1024:.1f} KiB mean JPEG, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs, median of {args.repeats} repeats"
    )
    print(f"{'path':<56} {'images/s':>10} {'x raw':>7}")
    for name, rate, ratio in rows:
        print(f"{name:<56} {rate:>10.0f} {'' if ratio is None else f'{ratio:.2f}':>7}")
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "images": info.num_images,
        "image_size": [h, w],
        "mean_jpeg_bytes": mean_bytes,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "epochs_per_measurement": args.epochs,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "dali": _dali_version(),
        "median": median,
        "runs": runs,
    }
    write_result(args.json, result)
    return 0


def _dali_version() -> str:
    from nvidia import dali

    return str(dali.__version__)


if __name__ == "__main__":
    sys.exit(main())
