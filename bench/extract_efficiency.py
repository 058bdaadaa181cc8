"""P3: extraction efficiency of ``rdkd extract-teacher``.

    efficiency = end-to-end extraction rate / bare teacher forward rate   (target >= 0.90)

- End-to-end: a full ``extract_teacher`` call over webdataset shards of generated JPEGs:
  reading tar members, decoding, the teacher's geometric preprocessing to uint8 and
  tokenisation in DataLoader workers, normalising on the device, image and text forward
  passes, L2-normalising, the float16 cast and the atomic shard, index and manifest writes.
  The rate is images / ``summary.seconds`` (everything after setup; dataset indexing and
  model loading are one-off costs and excluded). The stage's steady-state rate (pipeline
  fill excluded; defined in ``rdkd.stages.extract_teacher``) is reported over the bare rate
  too.
- Bare forward: the same teacher, batch size and precision on the same images, decoded and
  preprocessed beforehand into one tensor, and the same captions tokenised beforehand:
  ``encode_image`` + ``encode_text`` per batch under ``torch.inference_mode`` and nothing else.

The teacher is open_clip's ``ViT-B-32`` with random weights (seed 0; no download); the
images are ``--images`` seeded 224 x 224 JPEGs (gradients plus noise, quality 90) with one
caption each. Bare and end-to-end runs alternate ``--repeats`` times in A-B-B-A order (so
a drifting machine load favours neither); the figure is the median of the per-repeat ratios
(each from a bare and an end-to-end run next to each other in time), with their min-max.
On a shared machine wall-clock rates swing with other jobs, so the script also prints a
CPU-time ratio: CPU seconds per image of the bare forward / of the whole extraction
(the extraction loop with its DataLoader workers; setup excluded), and the share of the
end-to-end wall time spent inside the teacher's encode calls. A cost breakdown
(decode + preprocess per image, shard writes) is printed to say what dominates, and the
bytes per image that leave the DataLoader workers (uint8 views + token ids, beside what the
same batch weighs with float32 pixels, as the stage shipped before).

    python bench/extract_efficiency.py                     # CPU defaults
    python bench/extract_efficiency.py --device cuda --images 4096 --batch-size 256 --workers 8
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rdkd import runtime
from rdkd.cache import writer
from rdkd.cache.views import ViewConfig
from rdkd.data import DataSpec, decode_image, open_dataset
from rdkd.models import ModelSpec, load_clip
from rdkd.stages import extract_teacher as stage

WORDS = ["red", "blue", "small", "large", "cat", "dog", "car", "tree", "on", "a", "the", "beside", "street", "sky"]


def write_shards(root: Path, images: int, per_shard: int, size: int = 224, seed: int = 0) -> DataSpec:
    """img2dataset-style tars of seeded ``size`` x ``size`` JPEGs with one caption each."""
    import tarfile

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shards = (images + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min((s + 1) * per_shard, images)):
                base, slope = rng.uniform(0, 255, 3), rng.uniform(-1, 1, (3, 2))
                pixels = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], -1)
                pixels += rng.normal(0, 20, pixels.shape)
                buffer = io.BytesIO()
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 12))))
                for name, data in ((f"{i:08d}.jpg", buffer.getvalue()), (f"{i:08d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return DataSpec(f"{root}/{{00000..{shards - 1:05d}}}.tar")


def bare_forward_rate(loaded, pixels: torch.Tensor, tokens: torch.Tensor, batch_size: int, device: torch.device,
                      precision: str) -> float:
    """Images per second of encode_image + encode_text on ready tensors (already on the device)."""
    n = len(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), runtime.autocast(device, precision):
        for i in range(0, n, batch_size):
            loaded.model.encode_image(pixels[i:i + batch_size])
            loaded.model.encode_text(tokens[i:i + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--per-shard", type=int, default=48, help="Images per data (and cache) shard.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process.")
    parser.add_argument("--work-dir", type=Path, default=None, help="Where data and caches go (default: a temp dir).")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    runtime.check_precision(args.precision, device)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="rdkd-bench-extract-"))
    spec = write_shards(work / "data", args.images, args.per_shard)
    torch.manual_seed(0)
    teacher_spec = ModelSpec(name="ViT-B-32")  # open_clip config, random init: no download
    loaded = load_clip(teacher_spec, device=device)

    # Pre-decoded inputs of the bare forward: the same images and captions, same preprocessing.
    dataset = open_dataset(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    t0 = time.perf_counter()
    pixels = torch.stack([loaded.preprocess(decode_image(dataset.read_image_bytes(i))) for i in range(len(dataset))])
    decode_s = (time.perf_counter() - t0) / len(dataset)
    torch.set_num_threads(threads)
    tokens = loaded.tokenizer([dataset.captions(i)[0] for i in range(len(dataset))])
    pixels, tokens = pixels.to(device), tokens.to(device)

    # What one batch weighs when it leaves a worker: uint8 views and token ids, as the stage's
    # DataLoader builds it, and the same batch with float32 pixels.
    inputs = stage.TeacherInputs(dataset, loaded, ViewConfig())
    batch = stage._collate([inputs[i] for i in range(min(args.batch_size, len(dataset)))])
    shipped = (batch.pixels.nbytes + batch.tokens.nbytes) / len(batch.keys)
    as_float32 = (batch.pixels.numel() * 4 + batch.tokens.nbytes) / len(batch.keys)

    # Time the shard writes inside the end-to-end runs (wrapping the writer the stage calls).
    write_seconds = [0.0]
    real_write_shard = writer.write_shard

    def timed_write_shard(*a, **k):
        t = time.perf_counter()
        try:
            return real_write_shard(*a, **k)
        finally:
            write_seconds[0] += time.perf_counter() - t

    writer.write_shard = timed_write_shard

    bare_forward_rate(loaded, pixels[: args.batch_size], tokens[: args.batch_size], args.batch_size, device,
                      args.precision)  # warm-up
    def cpu_seconds() -> float:
        """CPU time of this process and of its finished children (the DataLoader workers)."""
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def run_bare() -> tuple[float, float]:
        cpu = cpu_seconds()
        rate = bare_forward_rate(loaded, pixels, tokens, args.batch_size, device, args.precision)
        return rate, (cpu_seconds() - cpu) / len(pixels)

    # Time inside the teacher's encode calls during extraction: 1 - its share of the
    # end-to-end time is what the pipeline around the forward costs.
    forward_seconds = [0.0]
    real_load_clip = stage.load_clip

    def timed_load_clip(*a, **k):
        teacher = real_load_clip(*a, **k)
        for name in ("encode_image", "encode_text"):
            encode = getattr(teacher.model, name)

            def timed(x, encode=encode):
                t = time.perf_counter()
                try:
                    return encode(x)
                finally:
                    forward_seconds[0] += time.perf_counter() - t

            setattr(teacher.model, name, timed)
        return teacher

    stage.load_clip = timed_load_clip

    # CPU time of the extraction loop itself (its workers are joined before it returns).
    loop_cpu = [0.0]
    real_extract_shards = stage._extract_shards

    def timed_extract_shards(*a, **k):
        cpu = cpu_seconds()
        try:
            return real_extract_shards(*a, **k)
        finally:
            loop_cpu[0] = cpu_seconds() - cpu

    stage._extract_shards = timed_extract_shards

    def run_e2e(r: int) -> tuple[float, float, float]:
        write_seconds[0] = forward_seconds[0] = 0.0
        summary = stage.extract_teacher(spec, teacher_spec, work / f"cache-{r}", batch_size=args.batch_size,
                                        workers=args.workers, device=str(device), precision=args.precision,
                                        progress=False)
        forward_shares.append(forward_seconds[0] / summary.seconds)
        steady.append(summary.steady_images_per_second or float("nan"))
        return summary.images / summary.seconds, write_seconds[0] / summary.seconds, loop_cpu[0] / summary.images

    bare, e2e, steady, writes, cpu_ratios, forward_shares = [], [], [], [], [], []
    for r in range(args.repeats):
        # A B B A ...: a machine whose load drifts during the run biases neither side.
        if r % 2 == 0:
            bare_rate, bare_cpu = run_bare()
            rate, write_share, e2e_cpu = run_e2e(r)
        else:
            rate, write_share, e2e_cpu = run_e2e(r)
            bare_rate, bare_cpu = run_bare()
        bare.append(bare_rate)
        e2e.append(rate)
        writes.append(write_share)
        cpu_ratios.append(bare_cpu / e2e_cpu)
        print(f"repeat {r}: bare forward {bare[-1]:.2f} img/s, end-to-end {e2e[-1]:.2f} img/s, "
              f"ratio {e2e[-1] / bare[-1]:.3f}, steady state {steady[-1]:.2f} img/s; CPU s/image bare {bare_cpu:.3f}, end-to-end {e2e_cpu:.3f}; "
              f"load average {os.getloadavg()[0]:.1f}")

    ratios = [e / b for e, b in zip(e2e, bare)]
    ratio = statistics.median(ratios)
    steady_ratios = [s / b for s, b in zip(steady, bare)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"teacher ViT-B-32 (random init), {args.images} JPEGs 224x224, batch {args.batch_size}, "
          f"workers {args.workers}, precision {args.precision}, repeats {args.repeats}")
    print(f"bare forward (image + text): median {statistics.median(bare):.1f} img/s "
          f"(min-max {min(bare):.1f}-{max(bare):.1f})")
    print(f"end-to-end extraction:       median {statistics.median(e2e):.1f} img/s "
          f"(min-max {min(e2e):.1f}-{max(e2e):.1f})")
    print(f"steady-state extraction:     median {statistics.median(steady):.1f} img/s "
          f"(min-max {min(steady):.1f}-{max(steady):.1f}), over the bare forward: median "
          f"{statistics.median(steady_ratios):.3f} (min-max {min(steady_ratios):.3f}-{max(steady_ratios):.3f})")
    print(f"bytes per image leaving the workers: {shipped:,.0f} (uint8 {tuple(batch.pixels.shape[1:])} + "
          f"{batch.tokens.shape[1]} token ids); with float32 pixels {as_float32:,.0f} ({as_float32 / shipped:.2f}x)")
    print(f"cost breakdown: decode + preprocess {decode_s * 1e3:.2f} ms/image on one core "
          f"(in workers, overlapped), forward {1e3 / statistics.median(bare):.2f} ms/image, "
          f"shard writes {statistics.median(writes):.1%} of end-to-end time")
    print(f"teacher forward share of end-to-end wall time: median {statistics.median(forward_shares):.3f} "
          f"(min-max {min(forward_shares):.3f}-{max(forward_shares):.3f}); the rest is the pipeline around it")
    print(f"CPU-time efficiency (bare CPU s/image / end-to-end CPU s/image, workers included): median "
          f"{statistics.median(cpu_ratios):.3f} (min-max {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")
    print(f"P3 extraction efficiency = {ratio:.3f} (median of the per-repeat ratios, min-max "
          f"{min(ratios):.3f}-{max(ratios):.3f}); target >= 0.90")


if __name__ == "__main__":
    main()
