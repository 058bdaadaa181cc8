"""Issue 19: the cost of checking every cache shard's sha256 before its rows train a student.

The reader hashes a shard the first time its rows are read (``rdkd.cache.reader``), so a
run pays one pass per shard as it meets it, instead of a pass over the whole cache before
the first step (``--verify-cache``) or none (``--no-verify-cache``). This measures a
``train-student --stream`` run (how a large cache is read: shard beside shard) on a cache
of ``--gib`` GiB (default 2.25) in each of the three settings:

1. generates, in ``--work`` (deleted at the end unless ``--keep``), webdataset shards of
   tiny samples (one 16 x 16 PNG shared by all, one caption each, ``--per-shard`` per tar)
   and their shard-aligned cache, written row by row with the project's own cache writer
   (``rdkd.cache.writer.write_shard`` + ``finalize``) from random unit vectors: no teacher
   is run. Wide rows (``--dim`` 4096, float32: 32 KiB an image with its caption) reach the
   size with few images, so the run reads many bytes per sample, as a real cache with
   several views does: a hard case for the check;
2. runs ``train_student`` in a fresh process per setting and repeat (settings interleaved),
   a tiny ViT student (the tests' 32 px CLIP), cliprd, ``--batch-size``, one DataLoader
   worker, ``--steps`` steps, a log record every ``--log-every`` steps;
3. reports per setting: **start-up**, the wall time from the ``train_student`` call to the
   start of the first step (opening the cache, the checks, the student, the first batch),
   and **steady state**, the samples/s of the log intervals after the first (median, and
   min-max over intervals and repeats).

The page cache holds the generated files (written just before), so the shards are hashed
at memory speed: the check's cost relative to a run reading from disk is smaller still.

    python bench/shard_check.py                      # ~15 min on 2 shared cores
    python bench/shard_check.py --gib 0.2 --steps 60 # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {"no check": False, "per-shard check": None, "full check first": True}


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def generate(work: Path, gib: float, dim: int, per_shard: int) -> tuple[str, Path, int]:
    """Tar shards and their cache; (data pattern, cache folder, images)."""
    from rdkd.cache import format as fmt
    from rdkd.cache import writer

    row_bytes = dim * 4
    images = int(gib * 2**30 // (2 * row_bytes))
    shards = -(-images // per_shard)
    data, cache = work / "data", work / "cache"
    data.mkdir(parents=True)
    png, rng, parts = _png(), np.random.default_rng(0), []
    for j in range(shards):
        keys = [f"{j:05d}{i:05d}" for i in range(min(per_shard, images - j * per_shard))]
        captions = [f"a tiny sample number {key}" for key in keys]
        with tarfile.open(data / f"{j:05d}.tar", "w") as tar:
            for key, caption in zip(keys, captions):
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.txt", caption.encode())
        vectors = rng.standard_normal((2 * len(keys), dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        n = len(keys)
        image_rows = writer.image_table(keys, np.zeros(n), np.tile([0, 0, 16, 16], (n, 1)), np.zeros(n, bool),
                                        vectors[:n], "float32")
        text_rows = writer.text_table(keys, np.zeros(n), captions, vectors[n:], "float32")
        start = j * per_shard
        parts.append(writer.write_shard(cache, j, range(start, start + n), "bench", image_rows, text_rows, []))
    header = {"cache_id": "bench", "rdkd_version": "bench", "dim": dim, "storage_dtype": "float32",
              "precision": "fp32", "views": {"count": 1}, "teacher": {"logit_scale": 100.0},
              "preprocess": {"resize_mode": "shortest"},
              "dataset": {"path": str(data), "format": "webdataset", "fingerprint": "bench", "entries": images},
              "layout": {"shards": shards, "shard_by": "data shard", "rows_per_shard": None}}
    writer.finalize(cache, header, parts, [])
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    print(f"generated {images:,} images in {shards} shards; cache {size / 2**30:.2f} GiB "
          f"({fmt.MANIFEST} + {2 * shards} Arrow files)", flush=True)
    return f"{data}/{{00000..{shards - 1:05d}}}.tar", cache, images


_RUN = """
import json, sys, time
import rdkd.stages.train_student as stage
from rdkd.data import DataSpec
first = []
real = stage.train_step
def timed(*args, **kwargs):
    if not first:
        first.append(time.perf_counter())
    return real(*args, **kwargs)
stage.train_step = timed
a = json.loads(sys.argv[1])
started = time.perf_counter()
stage.train_student(DataSpec(a["data"]), a["student"], "cliprd", a["cache"], stream=True, steps=a["steps"],
                    batch_size=a["batch"], workers=1, save_every=10**9, log_every=a["log_every"], seed=0,
                    verify_cache=a["verify"], out=a["out"], log_dir=a["out"] + "-logs", progress=False)
print(json.dumps({"startup_s": first[0] - started}))
"""


def run(setting: str, args: argparse.Namespace, data: str, cache: Path, student: Path, n: int) -> dict:
    out = args.work / f"run-{n}"
    spec = {"data": data, "cache": str(cache), "student": str(student), "steps": args.steps, "batch": args.batch_size,
            "log_every": args.log_every, "verify": SETTINGS[setting], "out": str(out)}
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    records = [json.loads(line) for line in Path(f"{out}-logs/metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)
    shutil.rmtree(f"{out}-logs")
    return {"startup_s": json.loads(done.stdout.splitlines()[-1])["startup_s"],
            "rates": [r["samples_per_s"] for r in records[1:]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench-shard-check"))
    parser.add_argument("--gib", type=float, default=2.25)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--per-shard", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="Keep the generated files.")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from builders import TINY_CLIP_CONFIG

    if args.work.exists():
        sys.exit(f"{args.work} exists; remove it or give another --work")
    try:
        t = time.perf_counter()
        data, cache, images = generate(args.work, args.gib, args.dim, args.per_shard)
        print(f"generation took {time.perf_counter() - t:.0f} s", flush=True)
        student = args.work / "student.json"
        student.write_text(json.dumps(TINY_CLIP_CONFIG))
        results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        n = 0
        for repeat in range(args.repeats):
            for setting in SETTINGS:
                n += 1
                result = run(setting, args, data, cache, student, n)
                results[setting].append(result)
                print(f"repeat {repeat}: {setting}: start-up {result['startup_s']:.2f} s, steady "
                      f"{statistics.median(result['rates']):.0f} samples/s", flush=True)
        base = statistics.median([r for x in results["no check"] for r in x["rates"]])
        print(f"\n{images:,} images, {args.steps} steps of {args.batch_size} ({args.steps * args.batch_size:,} "
              f"samples), {args.repeats} repeats")
        print("| setting | start-up s (median, min-max) | steady samples/s (median, min-max) | vs no check |")
        print("|---|---|---|---|")
        for setting, runs in results.items():
            starts = [r["startup_s"] for r in runs]
            rates = [rate for r in runs for rate in r["rates"]]
            median = statistics.median(rates)
            print(f"| {setting} | {statistics.median(starts):.2f} ({min(starts):.2f}-{max(starts):.2f}) | "
                  f"{median:.0f} ({min(rates):.0f}-{max(rates):.0f}) | {100 * (median / base - 1):+.1f}% |")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
