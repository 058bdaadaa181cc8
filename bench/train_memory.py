"""P5: does train-student's memory grow with the cache? Target: < 200 MB more RSS for a
cache 10x larger, training the same number of steps.

Two generated datasets (``--images`` and 10x as many 32 x 32 JPEGs, one caption each) get a
cache each from the same tiny teacher with a wide embedding (``--dim``, default 2048) and
``--views`` views per image, stored as float32, so that the big cache is ~400 MB: a
trainer that loaded it into memory would show. Each cache then trains the same
small student for the same steps in a fresh process (``rdkd train-student`` via
``train_student``), which reports its peak RSS.
The child samples ``/proc/self/status`` every 5 ms and splits its RSS into anonymous
memory (heap, tensors, the join arrays: what the trainer allocates) and file-backed pages
(libraries, and the memory-mapped cache pages the reader touches: embedding rows are read
with pread, so only the small key index and crop boxes are read through the mapping).

P5 = peak anonymous RSS (10x cache) - peak anonymous RSS (1x cache); the growth of the
total peak RSS (``VmHWM``) and of the mapped cache pages is printed beside it. The
dataset's own index (keys, captions) grows with it too and is part of the figure. P4
(teacher forwards = 0) is printed from both runs' ``teacher_forwards``.

    python bench/train_memory.py                  # 1,000 vs 10,000 images, ~2-3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import write_dataset  # noqa: E402

from rdkd.cache import ViewConfig  # noqa: E402
from rdkd.models import ModelSpec  # noqa: E402
from rdkd.stages.extract_teacher import extract_teacher  # noqa: E402

CHILD = """
import json, sys, threading, time, torch
torch.set_num_threads(1)
from rdkd.data import DataSpec
from rdkd.stages.train_student import train_student

def status(keys=("RssAnon", "RssFile")):  # bytes of RssAnon (heap, tensors), RssFile (mapped files)
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in keys}

peak = {"RssAnon": 0, "RssFile": 0}
def watch():
    while True:
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
data, cache, student, out, steps, batch = sys.argv[1:7]
info = train_student(DataSpec(data), student, "cliprd", cache, steps=int(steps), batch_size=int(batch),
                     workers=0, device="cpu", progress=False, out=out, save_every=10**9)
# VmHWM, not ru_maxrss: the latter keeps the parent's RSS from before exec
print(json.dumps({"peak_rss": status(("VmHWM",))["VmHWM"],
                  "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"],
                  "teacher_forwards": info["teacher_forwards"], "samples": info["samples"]}))
"""


def tiny_config(embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


def cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images of the small dataset (the big one: 10x)")
    parser.add_argument("--dim", type=int, default=2048, help="teacher embedding dim (wide: the 10x cache is ~400 MB)")
    parser.add_argument("--views", type=int, default=4, help="views per image in the caches")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="rdkd-bench-memory-") as tmp:
        tmp = Path(tmp)
        teacher_config = tmp / "teacher.json"
        teacher_config.write_text(json.dumps(tiny_config(args.dim)))
        student_config = tmp / "student.json"
        student_config.write_text(json.dumps(tiny_config(256)))  # its own dim: the heads are used
        results = {}
        for label, images in (("1x", args.images), ("10x", 10 * args.images)):
            start = time.perf_counter()
            spec = write_dataset(tmp / f"data-{label}", images, args.seed, size=32)
            torch.manual_seed(0)
            extract_teacher(spec, ModelSpec(config=str(teacher_config)), tmp / f"cache-{label}",
                            views=ViewConfig(count=args.views, seed=args.seed), batch_size=256, workers=1,
                            device="cpu", storage_dtype="float32", progress=False)
            made_s = time.perf_counter() - start
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, spec.path, str(tmp / f"cache-{label}"), str(student_config),
                 str(tmp / f"run-{label}"), str(args.steps), str(args.batch)],
                capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                sys.exit(f"train-student failed on the {label} cache:\n{proc.stderr[-3000:]}")
            results[label] = {**json.loads(proc.stdout.strip().splitlines()[-1]),
                              "cache_bytes": cache_bytes(tmp / f"cache-{label}"), "prepare_s": made_s}

    mb = 1 / 2**20
    print(f"machine: 1 torch thread, CPU; student: tiny ViT (embed 256), teacher: tiny ViT with embed "
          f"{args.dim} (float32 cache, {args.views} views); {args.steps} steps of batch {args.batch}, cliprd")
    for label, r in results.items():
        print(f"{label:>3} cache: {r['samples']:6d} images, {r['cache_bytes'] * mb:7.1f} MB on disk; "
              f"train-student peak RSS {r['peak_rss'] * mb:7.1f} MB = anonymous {r['peak_anon'] * mb:7.1f} MB "
              f"+ mapped files {r['peak_file'] * mb:7.1f} MB (peaks); teacher forwards {r['teacher_forwards']}")
    big, small = results["10x"], results["1x"]
    print(f"P5 = peak anonymous RSS growth for a 10x cache = {(big['peak_anon'] - small['peak_anon']) * mb:.1f} MB"
          f"   (target < 200 MB; the 10x cache is {(big['cache_bytes'] - small['cache_bytes']) * mb:.0f} MB larger)")
    print(f"     total peak RSS growth {(big['peak_rss'] - small['peak_rss']) * mb:.1f} MB, of which mapped "
          f"file pages {(big['peak_file'] - small['peak_file']) * mb:.1f} MB")
    print(f"P4 teacher forwards while training from an existing cache: "
          f"{results['1x']['teacher_forwards'] + results['10x']['teacher_forwards']}")


if __name__ == "__main__":
    main()
