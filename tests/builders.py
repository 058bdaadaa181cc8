"""Builders for tiny test models and datasets, shared by every test module.

conftest.py turns the standard ones into session fixtures; tests that need a variant (a bad
sample, another separator, a broken tar) call these functions with their own samples.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image

from rdkd.data import DataSpec

if TYPE_CHECKING:
    from rdkd.models import ModelSpec

# A tiny open_clip CLIP: fast on CPU, the same code paths as a real ViT teacher.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# Tiny students with another embedding size than the tiny teacher's 32, so the loss's
# projection heads are used: a ViT and an open_clip ModifiedResNet (layers as a list).
TINY_VIT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RESNET = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# A student that draws from torch's global RNG while training (open_clip's patch dropout:
# half the patches of every image dropped at random), as users set it to train faster.
TINY_VIT_PATCH_DROPOUT = {**TINY_VIT, "vision_cfg": {**TINY_VIT["vision_cfg"], "patch_dropout": 0.5}}
# train_student options of a run of a few steps on the CPU
TRAIN_FAST = dict(batch_size=4, workers=0, progress=False, lr=2e-3, warmup=1)


def write_model_config(folder: Path, name: str, config: dict) -> str:
    """``config`` as ``folder/name.json``, an open_clip model-config file; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def make_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    """A deterministic image with structure (gradients plus noise), converted to ``mode``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-3, 3, size=(3, 2))
    channels = [base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)]
    array = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(h, w, 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="RGB")
    if mode == "RGBA":
        alpha = Image.fromarray((rng.uniform(0, 1, size=(h, w)) * 255).astype(np.uint8), mode="L")
        image.putalpha(alpha)
        return image
    return image.convert(mode)


def image_bytes(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@dataclass
class Sample:
    """One image with its captions, as the builders write it."""

    key: str
    data: bytes  # encoded image (or deliberately bad bytes)
    captions: tuple[str, ...]
    ext: str = "jpg"  # file / tar member extension


_EXT_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def standard_samples(n: int = 12, seed: int = 0) -> list[Sample]:
    """``n`` good samples of varied sizes and formats; every third has 3 captions, every
    fourth 2 (keys ``000000`` ...)."""
    sizes = [(48, 40), (32, 32), (64, 36), (40, 56), (33, 47), (80, 60), (36, 36), (52, 44)]
    exts = ["jpg", "png", "webp", "jpg"]
    samples = []
    for i in range(n):
        ext = exts[i % len(exts)]
        image = make_image(seed * 1000 + i, sizes[i % len(sizes)])
        count = 3 if i % 3 == 0 else 2 if i % 4 == 0 else 1
        captions = tuple(f"a picture number {i}, caption {c}" for c in range(count))
        samples.append(Sample(f"{i:06d}", image_bytes(image, _EXT_FORMAT[ext]), captions, ext))
    return samples


def write_csv_dataset(root: Path, samples: Sequence[Sample], separator: str = "\t",
                      name: str = "data.tsv", image_column: str = "filepath",
                      caption_column: str = "title", key_column: str | None = None,
                      extra_rows: Iterable[tuple[str, str]] = ()) -> DataSpec:
    """open_clip CSV layout: one row per (image, caption), images in ``images/``.

    Rows of a multi-caption image are spread through the file (not adjacent) to check
    grouping. ``extra_rows`` are (relative path, caption) rows appended as they are.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in samples:
        rel = f"images/{sample.key}.{sample.ext}"
        (root / rel).write_bytes(sample.data)
        for c, caption in enumerate(sample.captions):
            rows.append((c, rel, caption, sample.key))
    rows.sort(key=lambda r: r[0])  # all first captions, then all second ones, ...
    header = [image_column, caption_column] + ([key_column] if key_column else [])
    path = root / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=separator)
        writer.writerow(header)
        for _, rel, caption, key in rows:
            writer.writerow([rel, caption] + ([key] if key_column else []))
        for rel, caption in extra_rows:
            writer.writerow([rel, caption] + ([""] if key_column else []))
    return DataSpec(str(path), format="auto", image_column=image_column, caption_column=caption_column,
                    key_column=key_column, separator=separator)


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A plain (ustar) tar with the given members in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_tar_member(tar, name, data)
    return path


def sample_members(sample: Sample, with_json: bool = True) -> list[tuple[str, bytes]]:
    """img2dataset's members for one sample; several captions go on separate lines of KEY.txt."""
    members = [(f"{sample.key}.{sample.ext}", sample.data),
               (f"{sample.key}.txt", "\n".join(sample.captions).encode("utf-8"))]
    if with_json:
        meta = {"key": sample.key, "caption": sample.captions[0], "status": "success"}
        members.append((f"{sample.key}.json", json.dumps(meta).encode()))
    return members


def write_wds_dataset(root: Path, samples: Sequence[Sample], per_shard: int = 6) -> DataSpec:
    """Shards ``00000.tar``, ``00001.tar`` ... as img2dataset writes them; spec uses a brace pattern."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for s, shard in enumerate(shards):
        write_tar(root / f"{s:05d}.tar", [m for sample in shard for m in sample_members(sample)])
    pattern = f"{root}/{{00000..{len(shards) - 1:05d}}}.tar"
    return DataSpec(pattern, format="auto")


def write_parquet_dataset(root: Path, samples: Sequence[Sample], per_file: int = 7,
                          row_group_size: int = 3, key_column: str | None = "key",
                          image_column: str = "image", caption_column: str = "caption",
                          list_captions: bool = True) -> DataSpec:
    """A folder of Parquet files: image bytes, captions (a list column when ``list_captions``),
    and a key column; several small row groups so reads cross group boundaries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for f, start in enumerate(range(0, len(samples), per_file)):
        part = samples[start:start + per_file]
        columns = {
            image_column: pa.array([s.data for s in part], type=pa.binary()),
            caption_column: (pa.array([list(s.captions) for s in part], type=pa.list_(pa.string()))
                             if list_captions else pa.array([s.captions[0] for s in part], type=pa.string())),
        }
        if key_column:
            columns[key_column] = pa.array([s.key for s in part], type=pa.string())
        pq.write_table(pa.table(columns), root / f"part-{f:05d}.parquet", row_group_size=row_group_size)
    return DataSpec(str(root), format="auto", image_column=image_column, caption_column=caption_column,
                    key_column=key_column)


class DecodedImages:
    """A torch-style dataset decoding in DataLoader workers, as the stages do (module-level,
    and importing no model code, so that spawned workers start fast)."""

    def __init__(self, ds, size: int = 8):
        self.ds = ds
        self.size = size

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        import torch

        image = self.ds.read_image(i).resize((self.size, self.size))
        return torch.from_numpy(np.asarray(image).copy())


def write_tiny_clip(root: Path, seed: int = 0, config: dict | None = None) -> ModelSpec:
    """Save a seeded random-init tiny CLIP (state_dict via torch.save) plus its config JSON."""
    import torch

    from rdkd.models import ModelSpec, load_clip

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / "tiny-clip.json"
    config_path.write_text(json.dumps(config or TINY_CLIP_CONFIG, indent=2))
    torch.manual_seed(seed)
    model = load_clip(ModelSpec(config=str(config_path))).model
    # A non-default logit scale, so that code reading it from the checkpoint is checked.
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(50.0)))
    checkpoint = root / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return ModelSpec(config=str(config_path), pretrained=str(checkpoint))


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Run ``rdkd ARGS`` in-process as the console script does; (exit code, stderr)."""
    import sys

    from rdkd import cli

    old_argv = sys.argv
    sys.argv = ["rdkd", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = old_argv
    return code, capsys.readouterr().err
