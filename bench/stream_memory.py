"""What a train-student rank holds in memory, streamed (--stream) vs indexed, as the data grows.

Two generated webdataset datasets (``--images`` and 10x as many 32 x 32 JPEGs, one caption
each, ``--per-shard`` samples a tar) get a cache each from the same tiny teacher (float16,
one view). Each trains the same tiny student for the same steps in a fresh process, once
with ``--stream`` and once from the index, with ``--workers`` DataLoader workers. A thread
in the child samples every 10 ms the summed anonymous RSS (heap, tensors: what the
processes allocate; file-backed pages, i.e. libraries and the page cache of mapped files,
are left out) of the training process and its workers, and the training process's own.

Printed per run: peak anonymous RSS of the process tree and of the main process, and
seconds from process start to the first step's end (imports, setup, index, first batch);
then the growth 1x -> 10x of each. Last, what the one per-shard structure a streaming rank
(and each of its workers) holds costs at scale: the Python objects of a cache manifest of
``--manifest-shards`` shards (LAION-400M in img2dataset's 10,000-sample tars: 40,000).

    python bench/stream_memory.py                       # 5,000 vs 50,000 images, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdkd.cache import ViewConfig
from rdkd.data import DataSpec
from rdkd.models import ModelSpec
from rdkd.stages.extract_teacher import extract_teacher

CHILD = """
import json, os, sys, threading, time
start = time.perf_counter()
import psutil, torch
torch.set_num_threads(1)
import rdkd.stages.train_student as stage
from rdkd.data import DataSpec

me = psutil.Process()
peak = {"tree": 0, "main": 0}
def anon(process):
    try:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{process.pid}/status"))
        return int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, KeyError):
        return 0
def watch():
    while True:
        main = anon(me)
        tree = main + sum(anon(child) for child in me.children(recursive=True))
        peak["main"], peak["tree"] = max(peak["main"], main), max(peak["tree"], tree)
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
first = {}
real_step = stage.train_step
def step(run, batch, window):
    real_step(run, batch, window)
    first.setdefault("s", time.perf_counter() - start)
stage.train_step = step
data, cache, student, out, steps, batch, workers, stream = sys.argv[1:9]
info = stage.train_student(DataSpec(data), student, "cliprd", cache, steps=int(steps), batch_size=int(batch),
                           workers=int(workers), device="cpu", progress=False, out=out, save_every=10**9,
                           stream=stream == "stream")
time.sleep(0.05)
print(json.dumps({"tree": peak["tree"], "main": peak["main"], "first_step_s": first["s"],
                  "samples": info["samples"]}))
"""

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def write_shards(root: Path, images: int, per_shard: int, seed: int) -> DataSpec:
    """``images`` seeded 32 x 32 JPEGs with a caption each, in tars of ``per_shard``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = (images + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="JPEG")
                for name, data in ((f"{i:08d}.jpg", buffer.getvalue()),
                                   (f"{i:08d}.txt", f"a generated picture number {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return DataSpec(f"{root}/{{00000..{shards - 1:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="images of the small dataset (the big one: 10x)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--manifest-shards", type=int, default=40_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="rdkd-bench-stream-") as tmp:
        tmp = Path(tmp)
        config = tmp / "tiny.json"
        config.write_text(json.dumps(TINY))
        for label, images in (("1x", args.images), ("10x", 10 * args.images)):
            spec = write_shards(tmp / f"data-{label}", images, args.per_shard, args.seed)
            torch.manual_seed(0)
            extract_teacher(spec, ModelSpec(config=str(config)), tmp / f"cache-{label}",
                            views=ViewConfig(count=1), batch_size=256, workers=1, device="cpu", progress=False)
            for mode in ("stream", "index"):
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, spec.path, str(tmp / f"cache-{label}"), str(config),
                     str(tmp / f"run-{label}-{mode}"), str(args.steps), str(args.batch), str(args.workers), mode],
                    capture_output=True, text=True, timeout=1800)
                if proc.returncode != 0:
                    sys.exit(f"train-student ({mode}) failed on the {label} data:\n{proc.stderr[-3000:]}")
                results[label, mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = 1 / 2**20
    print(f"machine: CPU, 1 torch thread; tiny student and teacher (32 px); {args.steps} steps of batch "
          f"{args.batch}, {args.workers} DataLoader workers, {args.per_shard} samples a shard")
    for (label, mode), r in results.items():
        print(f"{label:>3} {mode:>6}: {r['samples']:7d} samples; peak anonymous RSS: process tree "
              f"{r['tree'] * mb:7.1f} MB, training process {r['main'] * mb:7.1f} MB; first step after "
              f"{r['first_step_s']:5.1f} s")
    for mode in ("stream", "index"):
        big, small = results["10x", mode], results["1x", mode]
        print(f"{mode:>6} growth 1x -> 10x: tree {(big['tree'] - small['tree']) * mb:+7.1f} MB, training process "
              f"{(big['main'] - small['main']) * mb:+7.1f} MB, first step {big['first_step_s'] - small['first_step_s']:+5.1f} s")
    print(f"a cache manifest of {args.manifest_shards} shards: {manifest_bytes(args.manifest_shards) * mb:.1f} MB "
          f"of Python objects once parsed")


def manifest_bytes(shards: int) -> int:
    """Bytes of the parsed ``shards`` records of a manifest as extract-teacher writes them
    (10,000 entries a shard, file names, rows, sizes, sha256s), measured by tracemalloc."""
    import tracemalloc

    def record(j: int) -> dict:
        return {"shard": j, "entries": [j * 10_000, (j + 1) * 10_000],
                **{kind: {"file": f"{kind}/part-{j:05d}.arrow", "rows": 9_876, "bytes": 15_234_567,
                          "sha256": f"{j:064x}"} for kind in ("images", "texts")}}

    text = json.dumps({"shards": [record(j) for j in range(shards)]})
    tracemalloc.start()
    parsed = json.loads(text)
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del parsed
    return size


if __name__ == "__main__":
    main()
