"""P9: start-up of ``rdkd train-student`` against the dataset size (issue #11).

Before the first step, train-student opens the dataset (index: keys, captions, where the
images are) and joins it with the teacher cache. Both used to cost Python per entry, every
launch and every rank (issue #11: 10.9 s at 20k entries, 32.3 s at 200k for a 1-step run,
~120 us an entry). This measures them at two dataset sizes:

1. writes N webdataset samples per size (default 20,000 and 200,000) of tiny 32 x 32 JPEGs
   with one caption each, 10,000 a shard, keys as img2dataset makes them, and extracts
   their cache with a tiny random teacher (``extract_teacher``, in-process, 1 view);
2. in fresh processes, ``--repeats`` times each (medians printed), first with the dataset's
   index cache removed (a first launch: the tar shards are scanned), then with it (a
   second launch):
   - ``open``: ``open_dataset``; ``join``: ``TeacherCache.open`` + ``PairDataset`` (the join
     with the cache); both timed inside the process;
   - ``run``: a whole 1-step ``train_student`` process (a tiny ViT student, cliprd, batch 32,
     ``workers=0``): from start to exit, and its peak RSS (VmHWM).
   Each figure as wall-clock time (``_s``) and as CPU time (``_cpu``, user + system, scan
   processes included): on a machine shared with other jobs the CPU time is the steadier.
   Sizes and launches are interleaved in every repeat.

Printed per size: seconds and us per entry; between the sizes: the marginal cost per entry
(delta t / delta N, fixed costs such as imports and the model cancel) and the ratio
t(big) / t(small) (10 for a cost proportional to N, 1 for a constant one).

    python bench/startup.py                       # 20k and 200k: ~30 min on 2 cores, half of it extraction
    python bench/startup.py --sizes 2000 20000    # quicker
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_memory import tiny_config  # noqa: E402

from rdkd.cache import ViewConfig  # noqa: E402
from rdkd.data import DataSpec  # noqa: E402
from rdkd.models import ModelSpec  # noqa: E402
from rdkd.stages.extract_teacher import extract_teacher  # noqa: E402

PER_SHARD = 10_000

PIECES = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from rdkd.cache import TeacherCache
from rdkd.data import DataSpec, open_dataset
from rdkd.training import ImageCfg, PairDataset

def clock():  # (wall, CPU of this process and of the scan processes it waited for)
    own, scans = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + scans.ru_utime + scans.ru_stime

start = clock()
dataset = open_dataset(DataSpec(sys.argv[1]))
opened = clock()
pairs = PairDataset(dataset, None, ImageCfg((32, 32), (0.5,) * 3, (0.5,) * 3), 0, caches=[TeacherCache.open(sys.argv[2])])
joined = clock()
print(json.dumps({"open_s": opened[0] - start[0], "open_cpu": opened[1] - start[1], "join_s": joined[0] - opened[0],
                  "join_cpu": joined[1] - opened[1], "entries": len(dataset), "usable": len(pairs)}))
"""

RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from rdkd.data import DataSpec
from rdkd.stages.train_student import train_student
data, cache, student, out = sys.argv[1:5]
train_student(DataSpec(data), student, "cliprd", cache, steps=1, batch_size=32, workers=0, device="cpu",
              progress=False, out=out, save_every=10**9)
fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_rss": int(fields["VmHWM"].split()[0]) * 1024}))
"""
FIGURES = ("open_s", "open_cpu", "join_s", "join_cpu", "run_s", "run_cpu")


def write_webdataset(root: Path, samples: int) -> DataSpec:
    """``samples`` tiny JPEGs with one caption each in tar shards of PER_SHARD samples."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(16):  # a few distinct images, reused: the bench is about the index, not decoding
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    shards = (samples + PER_SHARD - 1) // PER_SHARD
    for shard in range(shards):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * PER_SHARD, min(samples, (shard + 1) * PER_SHARD)):
                key = f"{shard:05d}{i % PER_SHARD:04d}"
                caption = f"a generated picture number {i}".encode()
                for name, data in ((f"{key}.jpg", jpegs[i % 16]), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return DataSpec(f"{root}/{{00000..{shards - 1:05d}}}.tar")


def child(script: str, *args: str) -> tuple[dict, float, float]:
    """(the JSON the child prints last, its wall time from start to exit, its CPU time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"child failed:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return json.loads(proc.stdout.strip().splitlines()[-1]), wall, cpu


def launch(spec: DataSpec, cache: Path, student: Path, out: Path, first: bool) -> dict:
    """open / join / 1-step run; ``first``: with the dataset's index cache removed before each."""
    index_cache = Path(spec.path).parent / ".rdkd-index"
    if first:
        shutil.rmtree(index_cache, ignore_errors=True)
    pieces, _, _ = child(PIECES, spec.path, str(cache))
    if first:
        shutil.rmtree(index_cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder (train-student refuses a used one)
    run, wall, cpu = child(RUN, spec.path, str(cache), str(student), str(out))
    return {**pieces, "run_s": wall, "run_cpu": cpu, "peak_rss": run["peak_rss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3, help="launches of each kind; medians are printed")
    parser.add_argument("--keep", type=Path, default=None, help="build the datasets and caches here and keep them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdkd-bench-startup-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher, student = work / "teacher.json", work / "student.json"
        teacher.write_text(json.dumps(tiny_config(64)))
        student.write_text(json.dumps(tiny_config(64)))
        specs = {}
        for n in args.sizes:
            spec_path, cache = work / f"data-{n}", work / f"cache-{n}"
            start = time.perf_counter()
            if not cache.exists():
                extract_teacher(write_webdataset(spec_path, n), ModelSpec(config=str(teacher)), cache,
                                views=ViewConfig(count=1), batch_size=512, workers=1, device="cpu", progress=False)
            specs[n] = DataSpec(f"{spec_path}/{{00000..{(n + PER_SHARD - 1) // PER_SHARD - 1:05d}}}.tar")
            print(f"N={n}: data and cache ready in {time.perf_counter() - start:.0f} s", flush=True)
        # sizes and launches interleaved, so that a busier spell of a shared machine hits all alike
        measured = {(n, kind): [] for n in args.sizes for kind in ("first", "second")}
        for repeat in range(args.repeats):
            for n in args.sizes:
                for kind in ("first", "second"):
                    measured[n, kind].append(launch(specs[n], work / f"cache-{n}", student,
                                                    work / f"runs-{n}" / f"{kind}-{repeat}", kind == "first"))
    results = {key: {name: float(np.median([m[name] for m in ms])) for name in ms[0]} for key, ms in measured.items()}
    spread = {key: (min(m["run_s"] for m in ms), max(m["run_s"] for m in ms)) for key, ms in measured.items()}

    small, big = args.sizes
    columns = [(n, kind) for n in args.sizes for kind in ("first", "second")]
    print(f"\nwebdataset of tiny JPEGs, {PER_SHARD} a shard; 1 torch thread; medians of {args.repeats} launches; "
          "s (us per entry); _s wall-clock, _cpu CPU time (scan processes included)")
    print(f"{'':14s}" + "".join(f"{f'N={n} {kind}':>24s}" for n, kind in columns))
    for name in FIGURES:
        cells = [f"{results[c][name]:8.2f} ({results[c][name] / c[0] * 1e6:7.1f} us)" for c in columns]
        print(f"{name:14s}" + "".join(f"{cell:>24s}" for cell in cells))
    print(f"{'run_s min-max':14s}" + "".join(f"{f'{spread[c][0]:.1f}-{spread[c][1]:.1f}':>24s}" for c in columns))
    print(f"{'run peak RSS':14s}" + "".join(f"{results[c]['peak_rss'] / 2**30:21.3f} GB" for c in columns))
    print(f"\ngrowth {small} -> {big}: marginal us per entry = delta t / delta N; ratio = t({big}) / t({small})")
    for kind in ("first", "second"):
        for name in FIGURES:
            a, b = results[small, kind][name], results[big, kind][name]
            print(f"  {kind:6s} launch {name:8s}: {(b - a) / (big - small) * 1e6:7.1f} us an entry, ratio {b / a:5.2f}")
        growth = (results[big, kind]["peak_rss"] - results[small, kind]["peak_rss"]) / 2**20
        print(f"  {kind:6s} launch peak RSS growth: {growth:.0f} MB")
    print(json.dumps({f"{n} {kind}": ms for (n, kind), ms in measured.items()}))


if __name__ == "__main__":
    main()
