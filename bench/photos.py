"""Real photos: a webdataset of JPEGs made from the photos packages ship, and what one CPU
core pays per sample to turn them into model inputs (issue #16).

    python bench/photos.py make [--out artifacts/photos]          # the three regimes, as shards
    python bench/photos.py time [--data artifacts/photos]         # CPU ms per sample, one core
    python bench/photos.py fidelity --teacher PATH [--teacher ViT-B-16]   # fast vs exact embeddings
    python bench/photos.py e2e [--counts 500 1500]                # extract-teacher CPU per image, web vs 224 px
    python bench/photos.py tile --data artifacts/photos --regime web --count 50000 --out DIR  # for bench/gpu.sh

``make``: the sources are scikit-image's sample photos (``skimage/data``: astronaut,
chelsea, coffee, rocket, retina, motorcycles, hubble, ihc, brick, grass, gravel, camera,
coins, moon) and matplotlib's ``grace_hopper.jpg``, 15 photos of 303 x 384 to 1,411 x
1,411 px. Every sample is a seeded random crop of one of them (35-100% of the area, aspect
3/4-4/3), flipped with probability 1/2, its brightness scaled by 0.8-1.2, then resized
(Pillow's antialiased bicubic) into one of three regimes, as img2dataset writes datasets:

- ``square``: 256 x 256 (a square crop), JPEG quality 95 (img2dataset's default size);
- ``web``: long side uniform in 500-800 px, quality 90 (CC3M / CC12M / LAION as downloaded);
- ``large``: long side uniform in 1,024-1,600 px, quality 90. The sources are at most
  1,411 px, so these are upscaled and smoother than a camera's photo (smaller files); the
  decode cost per pixel is what matters here.

Shards: ``<out>/<regime>/00000.tar`` (``KEY.jpg`` + ``KEY.txt``), ``--count`` samples per
regime (seed ``--seed``), and ``<out>/photos.json`` (file sizes, image sizes).

``time``: for each regime and each path, process time per sample on one core
(``torch.set_num_threads(1)``), the median of ``--repeats`` passes over ``--samples``
samples with min-max, and the implied samples/s of 16 such cores (16 x 1000 / ms). The
paths are rdkd's own functions, for each preprocessing (:mod:`rdkd.pixels`, ``exact`` and
``fast``) at 224 px, bicubic, resize shortest:

- ``decode``: :func:`rdkd.data.decode_image` alone (a full decode to RGB);
- ``extraction``: bytes -> the teacher's eval view, uint8 (what extract-teacher's workers
  do per image with one view);
- ``replay``: bytes -> one cached random view (crop box from ``ViewConfig()``: 8-100% of
  the area) at 224 px, uint8 (what train-student's workers do per sample);
- ``train``: bytes -> open_clip's train transform with CLIP-KD's crop scale (no cache;
  one way only);
- ``device-decode`` (CPU tensors): :mod:`rdkd.pixels`' batched decode of the ``--decode
  device`` path run on the CPU (torchvision's libjpeg-turbo decode, crop, antialiased
  tensor resize): the work the GPU takes over, for scale; its host cost on a GPU is reading
  the bytes.

``fidelity``: image embeddings of every sample of each regime through the ``fast`` path
against the ``exact`` one, for view 0 (eval view) and one random view (the same box both
ways): cosine mean / min / 1st percentile per teacher. ``--teacher`` takes a model as
``rdkd`` does (an open_clip name, random init unless written ``NAME@TAG`` for an
open_clip pretrained tag, or a local-dir / export folder), repeatable.

``e2e``: what a web JPEG costs ``rdkd extract-teacher`` end to end over the same photo
already at 224 px: the CLI with a tiny 224 px ViT (so that the feed dominates),
``--workers 0``, one thread, run at ``--counts`` N1 and N2 images of the web regime
(tiled) and of its photos resized and centre-cropped to 224 x 224 (JPEG q90); the marginal
CPU per image is (CPU(N2) - CPU(N1)) / (N2 - N1), start-up out. For ``exact`` and ``fast``.

``tile``: a regime's photos repeated, under new keys, into ``--count`` samples in shards of
5,000 (what ``bench/gpu.sh`` measures on a machine without scikit-image: the decode cost
of a sample is that of its bytes).

Results go to ``--json`` (default ``bench/results/photos-<command>.json``) as well as the console.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

REGIMES = {  # name: (long side range or square side, JPEG quality)
    "square": ((256, 256), 95),
    "web": ((500, 800), 90),
    "large": ((1024, 1600), 90),
}
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "ihc.png", "brick.png", "grass.png", "gravel.png",
                  "camera.png", "coins.png", "moon.png")
HERE = Path(__file__).resolve().parent


def sources() -> list[tuple[str, Image.Image]]:
    """The photos, as RGB, by name."""
    import matplotlib
    import skimage

    data = Path(skimage.__file__).parent / "data"
    paths = [data / name for name in SKIMAGE_PHOTOS]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    return [(p.stem, Image.open(p).convert("RGB")) for p in paths]


def make_photo(source: Image.Image, regime: str, rng: np.random.Generator) -> Image.Image:
    """One sample: random crop (35-100% of the area), flip, brightness, resized into the regime."""
    (low, high), _ = REGIMES[regime]
    width, height = source.size
    area = width * height * rng.uniform(0.35, 1.0)
    aspect = 1.0 if regime == "square" else float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = min(width, max(16, round(np.sqrt(area * aspect))))
    h = min(height, max(16, round(np.sqrt(area / aspect))))
    if regime == "square":
        w = h = min(w, h)
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    photo = source.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = ImageEnhance.Brightness(photo).enhance(float(rng.uniform(0.8, 1.2)))
    long_side = int(rng.integers(low, high + 1))
    scale = long_side / max(w, h)
    size = (long_side, long_side) if regime == "square" else (max(1, round(w * scale)), max(1, round(h * scale)))
    return photo.resize(size, Image.Resampling.BICUBIC)


def make(args: argparse.Namespace) -> dict:
    photos = sources()
    out = Path(args.out)
    report = {"seed": args.seed, "count": args.count, "sources": [name for name, _ in photos], "regimes": {}}
    for r, regime in enumerate(REGIMES):
        rng = np.random.default_rng([args.seed, r])
        folder = out / regime
        folder.mkdir(parents=True, exist_ok=True)
        sizes, dims = [], []
        with tarfile.open(folder / "00000.tar", "w") as tar:
            for i in range(args.count):
                name, source = photos[int(rng.integers(len(photos)))]
                photo = make_photo(source, regime, rng)
                buffer = io.BytesIO()
                photo.save(buffer, "JPEG", quality=REGIMES[regime][1])
                for suffix, data in ((".jpg", buffer.getvalue()), (".txt", f"a photo: {name}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sizes.append(len(buffer.getvalue()))
                dims.append(photo.size)
        pixels = [w * h for w, h in dims]
        median = dims[int(np.argsort(pixels)[len(pixels) // 2])]
        report["regimes"][regime] = {"quality": REGIMES[regime][1], "mean_kb": statistics.mean(sizes) / 1000,
                                     "median_size": list(median), "shard": str(folder / "00000.tar")}
        print(f"{regime:7s} {args.count} JPEGs q{REGIMES[regime][1]}, mean {statistics.mean(sizes) / 1000:.0f} KB, "
              f"median {median[0]} x {median[1]} px -> {folder / '00000.tar'}")
    (out / "photos.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def tile(args: argparse.Namespace) -> dict:
    write_tiled(read_regime(Path(args.data), args.regime), args.count, Path(args.out))
    print(f"{args.count} samples of {args.data}/{args.regime} in {args.out}")
    return {}


TINY_224 = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32,
                                            "patch_size": 32},
            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def e2e(args: argparse.Namespace) -> dict:
    import resource
    import sys
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="rdkd-e2e-", dir=args.tmp))
    model = work / "tiny-224.json"
    model.write_text(json.dumps(TINY_224))
    photos = read_regime(Path(args.data), "web")
    at_224 = []
    for key, data in photos:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        scale = 224 / min(image.size)
        image = image.resize((max(224, round(image.width * scale)), max(224, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        buffer = io.BytesIO()
        image.crop((left, top, left + 224, top + 224)).save(buffer, "JPEG", quality=90)
        at_224.append((key, buffer.getvalue()))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rdkd = [sys.executable, "-m", "rdkd.cli"]
    report: dict = {"counts": args.counts, "model": TINY_224, "ms_per_image": {}}
    for name, samples, preprocess in (("web exact", photos, "exact"), ("web fast", photos, "fast"),
                                      ("224 px exact", at_224, "exact")):
        cpu = []
        for count in args.counts:
            folder = work / f"{name.replace(' ', '-')}-{count}"
            write_tiled(samples, count, folder)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(rdkd + ["extract-teacher", "--data", str(folder), "--model", str(model), "--workers", "0",
                                   "--batch-size", "64", "--device", "cpu", "--preprocess", preprocess,
                                   "--no-progress", "--out", str(folder / "cache")], check=True, env=env,
                           capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        ms = 1000 * (cpu[1] - cpu[0]) / (args.counts[1] - args.counts[0])
        report["ms_per_image"][name] = ms
        print(f"extract-teacher, {name:13s}: {ms:.2f} ms CPU per image (marginal, {args.counts[0]} -> "
              f"{args.counts[1]} images)", flush=True)
    ms = report["ms_per_image"]
    for mode in ("exact", "fast"):
        extra = ms[f"web {mode}"] - ms["224 px exact"]
        report[f"web_over_224_{mode}_ms"] = extra
        print(f"a web JPEG costs extract-teacher {extra:.2f} ms more than the photo at 224 px ({mode})")
    return report


def write_tiled(samples: list[tuple[str, bytes]], count: int, out: Path) -> None:
    """``count`` webdataset samples cycling through ``samples`` under new keys, in shards of 5,000."""
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, count, 5000):
        with tarfile.open(out / f"{start // 5000:05d}.tar", "w") as tar:
            for i in range(start, min(start + 5000, count)):
                key, data = samples[i % len(samples)]
                for suffix, payload in ((".jpg", data), (".txt", f"photo {key}".encode())):
                    info = tarfile.TarInfo(f"{i:07d}{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def read_regime(data: Path, regime: str, limit: int | None = None) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of a regime's shard, in order."""
    samples = []
    with tarfile.open(data / regime / "00000.tar") as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                samples.append((member.name.split(".")[0], tar.extractfile(member).read()))
                if limit is not None and len(samples) == limit:
                    break
    return samples


def _renderers(size: int = 224):
    import open_clip

    from rdkd.pixels import MODES, ViewRenderer

    transform = open_clip.image_transform(size, is_train=False)
    return {mode: ViewRenderer(transform, size, "bicubic", "shortest", mode) for mode in MODES}


def _cached_view(key: str, width: int, height: int):
    from rdkd.cache.views import ViewConfig, random_view, view_rng

    return random_view(width, height, view_rng(key, 1, 0), ViewConfig())


def paths() -> dict:
    """name -> function of (key, bytes) that makes one sample's pixels."""
    import open_clip

    from rdkd.data import decode_image
    from rdkd.pixels import DeviceDecoder
    from rdkd.training import DEFAULT_CROP_SCALE
    from rdkd.runtime import uint8_transform

    renderers = _renderers()
    train = uint8_transform(open_clip.image_transform(224, is_train=True, aug_cfg={"scale": DEFAULT_CROP_SCALE}))
    decoder = DeviceDecoder(renderers["fast"], torch.device("cpu"))
    made = {"decode": lambda key, data: decode_image(data)}
    for mode, renderer in renderers.items():
        made[f"extraction {mode}"] = lambda key, data, r=renderer: r.eval_pixels(data)
        made[f"replay {mode}"] = lambda key, data, r=renderer: r.render(
            data, lambda w, h: [_cached_view(key, w, h)])
    made["train exact"] = lambda key, data: train(decode_image(data))
    made["device-decode (CPU tensors)"] = lambda key, data: decoder.decode([data], [[None]])
    return made


def time_paths(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    report = {"samples": args.samples, "repeats": args.repeats, "cores_implied": 16, "regimes": {}}
    for regime in args.regimes:
        samples = read_regime(Path(args.data), regime, args.samples)
        report["regimes"][regime] = {}
        for name, fn in paths().items():
            for key, data in samples[:8]:  # warm-up: lazy imports, allocator
                fn(key, data)
            per_sample = []
            for _ in range(args.repeats):
                start = time.process_time()
                for key, data in samples:
                    fn(key, data)
                per_sample.append((time.process_time() - start) * 1000 / len(samples))
            ms = statistics.median(per_sample)
            report["regimes"][regime][name] = {"ms": ms, "min": min(per_sample), "max": max(per_sample),
                                               "per_s_16_cores": 16 * 1000 / ms}
            print(f"{regime:7s} {name:28s} {ms:6.2f} ms ({min(per_sample):.2f}-{max(per_sample):.2f})  "
                  f"{16 * 1000 / ms:7,.0f} samples/s at 16 cores", flush=True)
    return report


def fidelity(args: argparse.Namespace) -> dict:
    from rdkd.models import load_clip, parse_model_spec
    from rdkd.pixels import ViewRenderer
    from rdkd.runtime import DeviceNormalize, normalize_of

    torch.manual_seed(0)  # random-init teachers: the same weights on every run
    report = {"teachers": {}}
    for name in args.teacher:
        model, _, tag = name.partition("@")
        loaded = load_clip(parse_model_spec(model, tag or None))
        renderers = {mode: ViewRenderer.of_model(loaded.preprocess, loaded.preprocess_cfg, mode)
                     for mode in ("exact", "fast")}
        normalize = DeviceNormalize(*normalize_of(loaded.preprocess), torch.device("cpu"))
        cfg = loaded.preprocess_cfg
        report["teachers"][name] = {"size": cfg["size"], "regimes": {}}
        for regime in args.regimes:
            samples = read_regime(Path(args.data), regime, args.samples)
            embeddings = {}
            for mode, renderer in renderers.items():
                pixels = torch.cat([renderer.render(data, lambda w, h, k=key: [None, _cached_view(k, w, h)])[0]
                                    for key, data in samples])
                with torch.inference_mode():
                    chunks = [loaded.model.encode_image(normalize(pixels[i:i + 64]), normalize=True)
                              for i in range(0, len(pixels), 64)]
                embeddings[mode] = torch.cat(chunks).float()
            cosine = (embeddings["exact"] * embeddings["fast"]).sum(1).view(-1, 2).numpy()
            row = {}
            for v, view in enumerate(("eval view", "random view")):
                c = cosine[:, v]
                row[view] = {"mean": float(c.mean()), "min": float(c.min()), "p1": float(np.percentile(c, 1))}
                print(f"{name} ({cfg['size']} px) {regime:7s} {view:11s}: cosine mean {c.mean():.5f}, "
                      f"min {c.min():.5f}, 1st percentile {np.percentile(c, 1):.5f} ({len(c)} images)", flush=True)
            report["teachers"][name]["regimes"][regime] = row
    return report


def machine() -> dict:
    import PIL

    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "pillow": PIL.__version__, "rdkd_commit": commit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make", help="write the shards")
    p.add_argument("--out", default="artifacts/photos")
    p.add_argument("--count", type=int, default=256, help="samples per regime")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("tile", help="repeat a regime's photos into COUNT samples")
    p.add_argument("--data", default="artifacts/photos")
    p.add_argument("--regime", default="web", choices=list(REGIMES))
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("e2e", help="extract-teacher's marginal CPU per image: web JPEG against 224 px")
    p.add_argument("--data", default="artifacts/photos")
    p.add_argument("--counts", type=int, nargs=2, default=[500, 1500])
    p.add_argument("--tmp", default=None, help="where the tiled shards and caches go (default: the system's)")
    p.add_argument("--json", default=None)
    for name, help_text in (("time", "CPU ms per sample"), ("fidelity", "fast vs exact embeddings")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data", default="artifacts/photos")
        p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
        p.add_argument("--samples", type=int, default=256 if name == "fidelity" else 128)
        p.add_argument("--json", default=None)
        if name == "time":
            p.add_argument("--repeats", type=int, default=3)
        else:
            p.add_argument("--teacher", action="append", required=True)
    args = parser.parse_args()
    report = {"make": make, "tile": tile, "time": time_paths, "fidelity": fidelity, "e2e": e2e}[args.command](args)
    if args.command in ("time", "fidelity", "e2e"):
        report["machine"] = machine()
        out = Path(args.json or HERE / "results" / f"photos-{args.command}.json")
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"written {out}")


if __name__ == "__main__":
    main()
