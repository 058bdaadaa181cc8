"""Stage ``demo-data``: write the demo world's captioned scenes in standard dataset formats.

The world (scenes, rendering, captions) lives in :mod:`rdkd.stages.demo_world`; this stage decides
the layout on disk and writes it. Splits are written as open_clip CSV (tab-separated
``filepath``/``title``, one row per caption, paths relative to the CSV's folder, plus the
PNG files) or as webdataset tar shards as img2dataset writes them (``KEY.png``,
``KEY.txt`` with one caption per line, ``KEY.json``), so the demo exercises the same
readers real data goes through. Zero-shot tasks are image-folder trees (ImageNet layout)
with ``classnames.txt`` and ``templates.txt`` beside the class folders.

Layout under ``out`` (defaults: pretrain and train as shards, test as CSV)::

    world.json                            vocabulary, config, splits, counts, seed
    pretrain/00000.tar ...                webdataset shards (or pretrain/pretrain.csv + images/)
    train/00000.tar ...
    test/test.csv                         filepath<TAB>title, several rows per image
    test/images/000000000.png ...
    test/scenes.jsonl                     (CSV splits) the scene and caption records per image
    zeroshot/<task>/<class>/<key>.png     image-folder tree, class folders without spaces
    zeroshot/<task>/classnames.txt        one class name per line, in sorted-folder order
    zeroshot/<task>/templates.txt         one template per line, each with ``{}``
    zeroshot/<task>/labels.csv            filepath<TAB>label (the same images as a CSV)

Everything is written into a sibling ``.<name>.partial`` folder and renamed into place at the
end, so an interrupted run leaves ``out`` as it was. A write the storage refuses (disk full,
read-only, permission) removes the partial folder and stops with one line
(:class:`rdkd.errors.StorageError`); the world is a function of its settings, so a rerun
writes the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import multiprocessing
import os
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import rdkd
from rdkd.stages import demo_world
from rdkd.stages.demo_world import PROFILES, Sample, WorldConfig
from rdkd.errors import UserError
from rdkd.files import writing
from rdkd.options import option

WORLD_FILE = "world.json"
WORLD_FORMAT_VERSION = 1
CSV_CHUNK = 250  # samples per job for CSV splits and zero-shot tasks (small: balanced over many workers)


@dataclasses.dataclass(frozen=True)
class _Job:
    """A contiguous range of samples one worker renders."""

    kind: str  # "split" or "zeroshot"
    name: str  # split name or zero-shot task
    start: int
    stop: int
    label: str | None = None  # zero-shot class
    captions: int = 1


def _render_job(cfg: WorldConfig, job: _Job) -> list[Sample]:
    if job.kind == "split":
        return [demo_world.make_sample(cfg, job.name, i, job.captions) for i in range(job.start, job.stop)]
    return [demo_world.make_zeroshot_sample(cfg, job.name, job.label, i) for i in range(job.start, job.stop)]


def _tasks(words: list[str] | None) -> tuple[str, ...] | None:
    """The command line's ``--zeroshot-task`` words; none given: the profile's tasks."""
    return tuple(words) if words else None


@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
    """``rdkd demo-data``'s options: where the world goes, its profile, overrides of the
    profile's :class:`WorldConfig` fields (``None``: the profile's value) and how it is
    written (``workers``, ``overwrite``; the bytes do not depend on them)."""

    out: Path = option(Path("artifacts/demo/data"), "Output folder of the world.", "--out", "-o")
    profile: str = option("demo", "Size preset: 'demo' (the dvc demo) or 'quick' (a few hundred images, CI).")
    seed: int | None = option(None, "World seed (profile default 0).")
    image_size: int | None = option(None, "Image side in pixels (default 32).", min=16)
    pretrain: int | None = option(None, "Images in the teacher's pretraining split.", min=0)
    train: int | None = option(None, "Images in the distillation split.", min=0)
    test: int | None = option(None, "Images in the multi-caption test split.", min=0)
    test_captions: int | None = option(None, "Paraphrased captions per test image.", min=1)
    zeroshot_tasks: tuple[str, ...] | None = option(
        None, "Zero-shot task (repeatable): shape, colour, size, position.", "--zeroshot-task", parse=_tasks,
        cli_type=Optional[List[str]])
    zeroshot_per_class: int | None = option(None, "Images per class of each zero-shot task.", min=0)
    min_objects: int | None = option(None, "Fewest objects in a scene.", min=1, max=3)
    max_objects: int | None = option(None, "Most objects in a scene.", min=1, max=3)
    relations: bool | None = option(None, "Captions with 'left of', 'above', ...", "--relations/--no-relations")
    noise: float | None = option(None, "Max Gaussian pixel-noise std (0-255 units).", min=0.0)
    pretrain_format: str | None = option(None, "'webdataset' or 'csv'.")
    train_format: str | None = option(None, "'webdataset' or 'csv'.")
    test_format: str | None = option(None, "'webdataset' or 'csv'.")
    shard_size: int | None = option(None, "Samples per webdataset shard.", min=1, max=10000)
    workers: int | None = option(None, "Rendering processes (default: CPU count, max 8).", min=1)
    overwrite: bool = option(False, "Replace an existing world with other settings.", "--overwrite/--no-overwrite")

    def world(self) -> WorldConfig:
        """The profile's config with every override that is not ``None`` applied and checked."""
        if self.profile not in PROFILES:
            raise UserError(f"unknown demo-data profile {self.profile!r}; choose from {', '.join(PROFILES)}")
        world_fields = {f.name for f in dataclasses.fields(WorldConfig)}
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name in world_fields and getattr(self, f.name) is not None}
        if "zeroshot_tasks" in changes:
            changes["zeroshot_tasks"] = tuple(changes["zeroshot_tasks"])
        cfg = dataclasses.replace(PROFILES[self.profile], **changes)
        try:
            cfg.validate()
        except ValueError as err:
            raise UserError(str(err)) from None
        return cfg


def _split_jobs(cfg: WorldConfig) -> list[_Job]:
    jobs = []
    for split in ("pretrain", "train", "test"):
        count = getattr(cfg, split)
        fmt = getattr(cfg, f"{split}_format")
        # Webdataset: one job per shard (so a job's output is one tar); CSV: fixed chunks.
        step = cfg.shard_size if fmt == "webdataset" else CSV_CHUNK
        captions = cfg.test_captions if split == "test" else 1
        jobs += [_Job("split", split, s, min(s + step, count), captions=captions) for s in range(0, count, step)]
    for task in cfg.zeroshot_tasks:
        for label in demo_world.ZEROSHOT_VOCAB[task]:
            n = cfg.zeroshot_per_class
            jobs += [_Job("zeroshot", task, s, min(s + CSV_CHUNK, n), label=label) for s in range(0, n, CSV_CHUNK)]
    return jobs


def _rendered(cfg: WorldConfig, jobs: Sequence[_Job], workers: int) -> Iterator[list[Sample]]:
    """Each job's samples, in job order, rendered in ``workers`` processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _render_job(cfg, job)
        return
    # spawn: workers need only numpy and PIL, and must not inherit a parent's torch threads.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(functools.partial(_render_job, cfg), jobs)


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: the same samples always give the same tar bytes
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _sample_json(sample: Sample, cfg: WorldConfig) -> dict:
    return {
        "key": sample.key,
        "caption": sample.captions[0].text,
        "status": "success",
        "width": cfg.image_size,
        "height": cfg.image_size,
        "scene": sample.scene.to_json(),
        "captions": [c.to_json() for c in sample.captions],
    }


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _write_shard(path: Path, samples: Iterable[Sample], cfg: WorldConfig) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            _tar_member(tar, f"{s.key}.png", s.png)
            _tar_member(tar, f"{s.key}.txt", "\n".join(c.text for c in s.captions).encode())
            _tar_member(tar, f"{s.key}.json", _dumps(_sample_json(s, cfg)).encode())


class _CsvSplit:
    """An open_clip CSV being appended to: images/, <split>.csv, scenes.jsonl."""

    def __init__(self, folder: Path, name: str, cfg: WorldConfig):
        self.folder, self.cfg = folder, cfg
        (folder / "images").mkdir(parents=True)
        self.csv_path = folder / f"{name}.csv"
        self._csv = open(self.csv_path, "w", encoding="utf-8", newline="\n")
        self._csv.write("filepath\ttitle\n")
        self._scenes = open(folder / "scenes.jsonl", "w", encoding="utf-8", newline="\n")

    def add(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            relative = f"images/{s.key}.png"
            (self.folder / relative).write_bytes(s.png)
            for caption in s.captions:
                self._csv.write(f"{relative}\t{caption.text}\n")
            self._scenes.write(_dumps({"filepath": relative, **_sample_json(s, self.cfg)}) + "\n")

    def close(self) -> None:
        self._csv.close()
        self._scenes.close()


class _ZeroshotTask:
    """An image-folder tree with classnames.txt, templates.txt and labels.csv."""

    def __init__(self, folder: Path, task: str):
        self.folder = folder
        self.classes = sorted(demo_world.ZEROSHOT_VOCAB[task], key=demo_world.class_folder)
        for label in self.classes:
            (folder / demo_world.class_folder(label)).mkdir(parents=True)
        (folder / "classnames.txt").write_text("".join(f"{c}\n" for c in self.classes), encoding="utf-8")
        templates = demo_world.ZEROSHOT_TEMPLATES[task]
        (folder / "templates.txt").write_text("".join(f"{t}\n" for t in templates), encoding="utf-8")
        self._rows: dict[str, list[str]] = {c: [] for c in self.classes}
        self._scenes: dict[str, list[str]] = {c: [] for c in self.classes}

    def add(self, label: str, samples: Iterable[Sample]) -> None:
        for s in samples:
            relative = f"{demo_world.class_folder(label)}/{s.key}.png"
            (self.folder / relative).write_bytes(s.png)
            self._rows[label].append(f"{relative}\t{label}\n")
            self._scenes[label].append(_dumps({"filepath": relative, "label": label, "scene": s.scene.to_json()}) + "\n")

    def close(self) -> None:
        # Rows in class-folder order: the same order an ImageFolder reader lists the files in.
        with open(self.folder / "labels.csv", "w", encoding="utf-8", newline="\n") as f:
            f.write("filepath\tlabel\n")
            for c in self.classes:
                f.writelines(self._rows[c])
        with open(self.folder / "scenes.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for c in self.classes:
                f.writelines(self._scenes[c])


def _world_description(cfg: WorldConfig, profile: str) -> dict:
    splits = {}
    for split in ("pretrain", "train", "test"):
        count = getattr(cfg, split)
        if count == 0:
            continue
        fmt = getattr(cfg, f"{split}_format")
        captions = cfg.test_captions if split == "test" else 1
        entry = {"format": fmt, "images": count, "captions": count * captions, "captions_per_image": captions}
        if fmt == "webdataset":
            shards = -(-count // cfg.shard_size)
            entry["path"] = f"{split}/{{00000..{shards - 1:05d}}}.tar"
            entry["shards"] = shards
        else:
            entry["path"] = f"{split}/{split}.csv"
        splits[split] = entry
    zeroshot = {}
    if cfg.zeroshot_per_class > 0:
        for task in cfg.zeroshot_tasks:
            classes = sorted(demo_world.ZEROSHOT_VOCAB[task], key=demo_world.class_folder)
            zeroshot[task] = {
                "path": f"zeroshot/{task}",
                "classnames": f"zeroshot/{task}/classnames.txt",
                "templates": f"zeroshot/{task}/templates.txt",
                "labels_csv": f"zeroshot/{task}/labels.csv",
                "classes": classes,
                "images": cfg.zeroshot_per_class * len(classes),
            }
    return {
        "format_version": WORLD_FORMAT_VERSION,
        "generator": "rdkd demo-data",
        "rdkd_version": rdkd.__version__,
        "profile": profile,
        "seed": cfg.seed,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()},
        "vocabulary": demo_world.vocabulary(),
        "splits": splits,
        "zeroshot": zeroshot,
    }


def _expected_files(description: dict) -> list[str]:
    """The files world.json promises: every shard or CSV, and each zero-shot task's lists."""
    files = []
    for name, split in description["splits"].items():
        if split["format"] == "webdataset":
            files += [f"{name}/{j:05d}.tar" for j in range(split["shards"])]
        else:
            files.append(split["path"])
    for task in description["zeroshot"].values():
        files += [task["classnames"], task["templates"], task["labels_csv"]]
    return files


def _files_present(out: Path, description: dict) -> bool:
    return all((out / f).is_file() for f in _expected_files(description))


def _check_destination(out: Path, description: dict, overwrite: bool) -> bool:
    """True when ``out`` already holds this very world; raise when it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if overwrite or not any(out.iterdir()):
        return False
    world = out / WORLD_FILE
    try:
        existing = json.loads(world.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise UserError(f"{out} exists and is not a demo world; pass --overwrite to replace it") from None
    if existing == description:
        return _files_present(out, description)  # same settings: rewrite only if files went missing
    raise UserError(f"{out} holds a demo world with other settings; pass --overwrite to replace it")


def demo_data(out: Path | str = DemoDataConfig.out, profile: str = DemoDataConfig.profile, *,
              progress: bool = True, **options: Any) -> dict:
    """Generate the demo world into ``out``; return its description (``world.json``).

    A fresh generation adds ``seconds`` (wall time) to the returned dict; world.json itself
    holds nothing that varies between runs.

    ``profile`` (``demo`` or ``quick``) sets every size; ``options`` are the other fields of
    :class:`DemoDataConfig` (``rdkd demo-data``'s options, by field name): overrides of
    :class:`rdkd.stages.demo_world.WorldConfig` fields (``seed``, ``image_size``, split
    sizes, formats, ...; ``None`` keeps the profile's value), ``workers`` processes that
    render in parallel (default: the CPU count, at most 8; the bytes written do not depend
    on it) and ``overwrite``. When ``out`` already holds the same world nothing is done; a
    different one is replaced only with ``overwrite``.
    """
    config = DemoDataConfig(out=Path(out), profile=profile, **options)
    cfg = config.world()
    out = config.out
    description = _world_description(cfg, profile)
    if _check_destination(out, description, config.overwrite):
        return description
    workers = min(os.cpu_count() or 1, 8) if config.workers is None else config.workers
    if workers < 1:
        raise UserError("workers must be >= 1")

    partial = out.parent / f".{out.name}.partial"
    try:
        with writing(out.parent):
            out.parent.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)  # left by an interrupted run: ours, never the user's output
            partial.mkdir()
    except OSError as err:  # e.g. a file where a folder should be
        raise UserError(f"cannot write to {out.parent}: {err.strerror or err}") from None

    started = time.perf_counter()
    try:
        with writing(out):
            _write_world(cfg, description, partial, workers, progress)
            _move_into_place(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # ours and half-written: not left to fill the disk
        raise
    return {**description, "seconds": round(time.perf_counter() - started, 2)}


def _write_world(cfg: WorldConfig, description: dict, partial: Path, workers: int, progress: bool) -> None:
    """Render every split and zero-shot task into ``partial``, then its ``world.json``."""
    jobs = _split_jobs(cfg)
    csv_splits: dict[str, _CsvSplit] = {}
    tasks: dict[str, _ZeroshotTask] = {}
    columns = (TextColumn("demo-data"), BarColumn(), MofNCompleteColumn(), TextColumn("images"), TimeRemainingColumn())
    total = sum(job.stop - job.start for job in jobs)
    with Progress(*columns, disable=not progress, transient=True) as bar:
        bar_task = bar.add_task("render", total=total)
        for job, samples in zip(jobs, _rendered(cfg, jobs, workers)):
            if job.kind == "split":
                folder = partial / job.name
                if getattr(cfg, f"{job.name}_format") == "webdataset":
                    folder.mkdir(exist_ok=True)
                    _write_shard(folder / f"{job.start // cfg.shard_size:05d}.tar", samples, cfg)
                else:
                    if job.name not in csv_splits:
                        csv_splits[job.name] = _CsvSplit(folder, job.name, cfg)
                    csv_splits[job.name].add(samples)
            else:
                if job.name not in tasks:
                    tasks[job.name] = _ZeroshotTask(partial / "zeroshot" / job.name, job.name)
                tasks[job.name].add(job.label, samples)
            bar.advance(bar_task, len(samples))
    for writer in [*csv_splits.values(), *tasks.values()]:
        writer.close()
    (partial / WORLD_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _move_into_place(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` folder to ``out``, replacing what was there."""
    if out.exists():
        stale = out.parent / f".{out.name}.replaced"
        if stale.exists():
            shutil.rmtree(stale)
        out.rename(stale)
        partial.rename(out)
        shutil.rmtree(stale)
    else:
        partial.rename(out)
