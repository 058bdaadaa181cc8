"""P8 (CPU part): what train-student's feed costs the host, counted where it can be seen.

Three figures of issue #10's targets, each from a full ``train_student`` run:

- ``syncs``: host-device synchronisations per training step at the default ``--log-every``
  (50). Every operation after which a CUDA host must wait for the device (``.item()``,
  ``float(t)``, ``bool(t)``, ``nonzero``, copies to the CPU) dispatches the same way on
  CPU, and ``rdkd.runtime.HostSyncCounter`` counts them in the training process. Per step =
  (count of a 2N-step run - count of an N-step run) / N, so set-up, the final checkpoint
  and the export cancel. Target <= 0.1.
- ``bytes``: bytes per sample that leave the DataLoader workers (every tensor of the
  batches the main process receives) over the essential payload (the uint8 image at the
  student's size + its tokens + the two teacher rows in the cache's storage dtype).
  Target <= 1.1.
- ``memory``: peak host memory of train-student's feed at batch ``--batch`` (1024), 224 px
  (ViT-T-16), ``--workers`` (16) workers: its set-up and DataLoader as the stage builds them,
  ``--batches`` batches drawn, no model step (on a GPU the activations are device memory;
  ``bench/gpu.sh`` measures the whole stage there with ``watch``). The figure is the peak
  over time of the summed anonymous and file-backed PSS of the process and its workers plus
  the growth of the machine's shared memory (``Shmem`` of /proc/meminfo: the batches in
  flight live there, counted once whether mapped or not). Target <= 8 GB.
- ``watch -- COMMAND...``: that same peak for any command (gpu.sh wraps train-student in it).

    python bench/train_feed.py syncs bytes          # ~1 min on 2 cores
    python bench/train_feed.py memory               # a few minutes on 2 cores (16 workers, batch 1024)
    python bench/train_feed.py watch -- rdkd train-student ...

The data: ``rdkd demo-data`` scenes at ``--image-size`` (CSV of PNGs), a cache from the
demo teacher (``demo-teacher-vit``, random init; its 32 px input is all a cache needs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rdkd.cache import TeacherCache
from rdkd.data import DataSpec
from rdkd.models import parse_model_spec
from rdkd.runtime import HostSyncCounter
from rdkd.stages.demo_data import demo_data
from rdkd.stages.extract_teacher import extract_teacher
from rdkd.stages.train_student import setup, TrainConfig, train_student


def make_data(root: Path, images: int, size: int) -> tuple[DataSpec, Path]:
    demo_data(root / "data", profile="quick", image_size=size, pretrain=0, test=0, zeroshot_per_class=0,
              train=images, train_format="csv", workers=2)
    spec = DataSpec(str(root / "data" / "train" / "train.csv"))
    extract_teacher(spec, parse_model_spec("demo-teacher-vit"), root / "cache", batch_size=256, workers=2,
                    progress=False)
    return spec, root / "cache"


def syncs_per_step(root: Path, spec: DataSpec, cache: Path, student: str, steps: int) -> dict:
    counts = {}
    for n in (steps, 2 * steps):
        with HostSyncCounter() as counter:
            train_student(spec, student, "cliprd", cache, steps=n, batch_size=8, workers=0, progress=False,
                          save_every=10**9, device="cpu", out=root / f"syncs-{n}")
        counts[n] = counter
    per_step = (counts[2 * steps].count - counts[steps].count) / steps
    return {"figure": "host syncs per step", "value": per_step, "target": "<= 0.1",
            "met": per_step <= 0.1, "ops_long_run": counts[2 * steps].ops}


def bytes_per_sample(root: Path, spec: DataSpec, cache: Path, student: str, batch: int, batches: int) -> dict:
    run = setup(TrainConfig(data=spec, student=student, method="cliprd", cache=str(cache), steps=1,
                            batch_size=batch, workers=2, device="cpu", out=str(root / "bytes")))
    shipped, samples = 0, 0
    for i, b in enumerate(run.feed.batches(0, run.plan.steps_per_epoch, **run.loader_options)):
        shipped += sum(v.nbytes for v in b.values() if isinstance(v, torch.Tensor))
        samples += len(b["index"])
        if i + 1 == batches:
            break
    height, width = run.feed.builder.image_cfg.size
    stored = TeacherCache.open(cache)
    row_bytes = torch.empty((), dtype={"float16": torch.float16, "bfloat16": torch.bfloat16,
                                       "float32": torch.float32}[stored.storage_dtype]).element_size()
    context = b["text"].shape[1]
    essential = 3 * height * width + context * b["text"].element_size() + 2 * stored.dim * row_bytes
    ratio = shipped / samples / essential
    return {"figure": "bytes per sample leaving the workers / essential", "value": ratio,
            "shipped_bytes_per_sample": shipped / samples, "essential_bytes_per_sample": essential,
            "float32_image_bytes": 4 * 3 * height * width, "target": "<= 1.1", "met": ratio <= 1.1}


def _tree_pss(pid: int) -> int:
    """Summed PSS (bytes) of a process and its descendants, anonymous and file-backed
    pages (their shared memory is counted once, system-wide, by :func:`_shmem`)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f
                             if line.startswith(("Pss_Anon:", "Pss_File:")))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return total


def _shmem() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def watch(command: list[str]) -> dict:
    """Run ``command``; the peak over time of (summed PSS of it and its descendants + the
    growth of the machine's Shmem), sampled every 50 ms."""
    shm_before = _shmem()
    child = subprocess.Popen(command)
    peak = {"pss": 0, "shm": 0, "sum": 0}

    def sample() -> None:
        while child.poll() is None:
            pss, shm = _tree_pss(child.pid), max(0, _shmem() - shm_before)
            peak.update(pss=max(peak["pss"], pss), shm=max(peak["shm"], shm), sum=max(peak["sum"], pss + shm))
            time.sleep(0.05)

    watcher = threading.Thread(target=sample)
    watcher.start()
    child.wait()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"{command[0]} failed with exit code {child.returncode}")
    gb = peak["sum"] / 1e9
    return {"figure": "peak PSS + shared-memory growth", "value_gb": gb, "peak_pss_gb": peak["pss"] / 1e9,
            "peak_shm_growth_gb": peak["shm"] / 1e9, "target": "<= 8 GB", "met": gb <= 8}


FEED_ONLY = """
import sys, torch
from rdkd.data import DataSpec
from rdkd.stages.train_student import TrainConfig, setup
data, cache, student, out, batch, workers, batches = sys.argv[1:8]
run = setup(TrainConfig(data=DataSpec(data), student=student, method="cliprd", cache=cache, steps=1,
                        batch_size=int(batch), workers=int(workers), device="cpu", out=out))
for i, b in enumerate(run.feed.batches(0, run.plan.steps_per_epoch, **run.loader_options)):
    if i + 1 == int(batches) * run.feed.pieces:
        break
"""


def feed_memory(root: Path, spec: DataSpec, cache: Path, student: str, batch: int, workers: int,
                batches: int) -> dict:
    """The feed of train-student alone (its set-up and its DataLoader as the stage builds
    them, ``batches`` batches drawn): on a GPU machine the model's activations live on the
    device, so this is the host memory that grows with batch size and workers. (On this
    CPU machine a real step of ViT-T-16 at batch 1024 would hold ~10 GB of activations in
    host memory, which a GPU run does not.)"""
    command = [sys.executable, "-c", FEED_ONLY, spec.path, str(cache), student, str(root / "feed"),
               str(batch), str(workers), str(batches)]
    result = watch(command)
    result["figure"] = f"train-student feed: peak PSS + shared memory, batch {batch}, {workers} workers"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["watch"]:
        command = sys.argv[3:] if sys.argv[2:3] == ["--"] else sys.argv[2:]
        print(json.dumps(watch(command)))
        return
    parser.add_argument("what", nargs="+", choices=["syncs", "bytes", "memory"])
    parser.add_argument("--student", default="ViT-T-16", help="student for bytes and memory (224 px)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="memory run: batches drawn from the feed")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        spec, cache = make_data(root, args.images, args.image_size)
        for what in args.what:
            if what == "syncs":
                result = syncs_per_step(root, spec, cache, "demo-student-vit", 50)
            elif what == "bytes":
                result = bytes_per_sample(root, spec, cache, args.student, 64, 4)
            else:
                result = feed_memory(root, spec, cache, args.student, args.batch, args.workers, args.batches)
            print(json.dumps(result))


if __name__ == "__main__":
    main()
