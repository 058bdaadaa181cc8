"""Stage three: score a model or a cache (``rdkd evaluate``).

What can be scored (exactly one):

- a model: any open_clip spec (:class:`rdkd.models.ModelSpec`): a student export written by
  ``rdkd train-student`` (``local-dir:.../export`` or its folder), the teacher, or any
  third-party open_clip model, encoded on the fly by :class:`rdkd.encoding.Encoder`, the
  encoder extract-teacher fills caches with (DataLoader workers decode and hand over uint8
  pixels, normalised on the device; ``precision`` fp32, or bf16/fp16 autocast; float32
  L2-normalisation; batches overlapped), so fidelity compares embeddings made one way.
  Pixels are made the teacher cache's way (:mod:`rdkd.pixels`: ``exact`` or ``fast``, from
  ``teacher_cache``, else from the student's ``run.json``, else exact); ``decode="device"``
  has the workers hand over the encoded images and the device decode them. Zero-shot class
  prompts go through the same encoder, grouped as ``open_clip.build_zero_shot_classifier``
  groups them;
- a teacher cache (``cache=``): its stored rows (view 0, the teacher's eval view) are scored
  as they are, with nothing recomputed: the images of ``data`` (whose fingerprint must match
  the cache's), or every image of the cache when no ``data`` is given.

A cache (scored, or the ``teacher_cache``) is checked as train-student checks one: every
file there with the size its manifest records before anything is encoded
(:meth:`rdkd.cache.TeacherCache.verify`), each file's sha256 before its rows are used. Keys
are joined to it in one :meth:`rdkd.cache.TeacherCache.lookup`.

What is measured:

- retrieval on ``data`` (any :class:`rdkd.data.DataSpec`; several captions per image are the
  multi-caption ground truth): ``retrieval/i2t_r1`` ... see :func:`rdkd.metrics.retrieval_metrics`;
- zero-shot classification for each :class:`ZeroShotTask` (needs a model):
  ``zeroshot/<task>/top1``, ``top5``, ``mean_per_class_top1``;
- geometry fidelity against ``teacher_cache`` (a cache of the same eval set, joined by key):
  ``fidelity/knn10_img`` ... see :func:`rdkd.metrics.fidelity_metrics`.

Outputs (``out`` is the metrics file; default ``artifacts/eval/<name>/metrics.json``):

- ``metrics.json``: one flat object of numbers (what ``dvc metrics`` reads), each at
  ``rdkd.metrics.WRITTEN_DIGITS`` significant digits (the same bytes on any CPU);
- ``evaluation.json`` beside it: what was scored and how (specs, fingerprints, index, seed,
  skipped samples with reasons; no timings: the bytes are the same from run to run);
- ``labels.json`` beside it: ``{"method", "student", "seed", "teacher_forwards", "embed_dim"}``,
  what ``rdkd report`` labels and compares runs by. Method, student, seed and teacher
  forwards are taken from the ``run.json`` that ``rdkd train-student`` writes next to its
  ``export/`` folder when the model is such an export, overridden by ``run_info``;
  otherwise method ``teacher`` for a cache and ``open_clip`` for other models, student the
  model's name, seed and teacher forwards null. ``embed_dim``: the scored embeddings' width.
- ``zeroshot_<task>_per_class.csv`` when ``per_class`` is set.

The files hold no timings, host names or paths other than those given, so the same inputs
give the same bytes (a pipeline can hash them).

Bad input (missing files, a damaged cache, a cache of another eval set, an empty class list,
a template without ``{}``, an index factory FAISS rejects) raises :class:`UserError` before
anything is written; the outputs are replaced atomically at the end, so a failed run loses
nothing.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, List, Optional, Sequence

import faiss
import numpy as np
import pyarrow as pa
import torch

from rdkd import metrics as M
from rdkd import pixels, runtime
from rdkd.cache import TeacherCache
from rdkd.data import IMAGE_EXTENSIONS, DataSpec, open_dataset
from rdkd.encoding import Encoder
from rdkd.errors import SampleError, UserError
from rdkd.files import atomic_write_csv, atomic_write_json
from rdkd.labels import LABELS_FILE, RUN_FILE, RunLabels
from rdkd.options import option

if TYPE_CHECKING:  # rdkd.models (open_clip) is imported when a model is loaded, not to score a cache
    from rdkd.models import LoadedClip

EVALUATION_INFO = "evaluation.json"
# Classes whose prompts go through the model in one forward: open_clip's
# build_zero_shot_classifier's batching, so that the classifier has its bits.
_CLASSES_PER_FORWARD = 10
_WNID = re.compile(r"^n\d{8}$")


# --- zero-shot tasks ------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroShotTask:
    """One zero-shot classification set.

    ``path`` is an image-folder tree (``root/<class folder>/<image>``, ImageNet layout: class
    index = position of the folder name in sorted order) or a CSV/TSV with an image column
    (paths relative to the file's folder) and a label column (a class index or a class name).
    ``classnames``: ``None`` (folder names, or ImageNet's 1000 names for a folder tree of 1000
    WordNet ids, or the sorted distinct labels of a CSV), ``"imagenet"``, a text file with one
    name per line, a comma-separated string, or a list. ``templates``: ``"openai"`` (the 80
    OpenAI ImageNet prompts of ``open_clip.zero_shot_metadata``), ``"simple"``, a text file
    with one template per line, a ``|``-separated string, or a list; each contains ``{}`` or
    ``{c}`` where the class name goes.
    """

    name: str
    path: str
    classnames: str | Sequence[str] | None = None
    templates: str | Sequence[str] = "openai"
    image_column: str = "filepath"
    label_column: str = "label"

    @classmethod
    def parse(cls, text: str) -> "ZeroShotTask":
        """``NAME=PATH[;classnames=...][;templates=...][;image_column=...][;label_column=...]``
        (``PATH`` alone names the task after the folder or file). A folder ``PATH`` holding
        ``classnames.txt`` or ``templates.txt`` supplies the option it does not name."""
        head, *settings = [part.strip() for part in text.split(";")]
        name, sep, path = head.partition("=")
        if not sep:
            name, path = Path(head.rstrip("/")).stem, head
        fields: dict[str, Any] = {"name": name.strip(), "path": path.strip()}
        allowed = {"classnames", "templates", "image_column", "label_column"}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep or key.strip() not in allowed:
                raise UserError(f"zero-shot task {text!r}: unknown option {setting!r} (allowed: {', '.join(sorted(allowed))})")
            fields[key.strip()] = value.strip()
        if not fields["name"] or not fields["path"]:
            raise UserError(f"zero-shot task {text!r}: expected NAME=PATH")
        folder = Path(fields["path"])
        if folder.is_dir():  # a task folder may carry its own lists (as rdkd demo-data writes them)
            for listing in ("classnames", "templates"):
                listed = folder / f"{listing}.txt"
                if listing not in fields and listed.is_file():
                    fields[listing] = str(listed)
        return cls(**fields)


@dataclass
class _ZeroShotSet:
    task: ZeroShotTask
    images: "_ImageFiles"
    labels: np.ndarray
    classnames: list[str]
    templates: list[Callable[[str], str]]


def _read_list(value: str, separator: str) -> list[str]:
    """A file with one item per line, or a ``separator``-joined literal list."""
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [item.strip() for item in value.split(separator) if item.strip()]


def resolve_classnames(value: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if value is None:
        names = list(default)
    elif isinstance(value, str):
        names = list(IMAGENET_CLASSNAMES) if value.strip().lower() == "imagenet" else _read_list(value, ",")
    else:
        names = [str(n).strip() for n in value if str(n).strip()]
    if not names:
        raise UserError("the zero-shot class list is empty")
    if len(set(names)) != len(names):
        raise UserError("the zero-shot class list has duplicate names")
    return names


def _fill_template(template: str, classname: str) -> str:
    return template.replace("{c}", classname).replace("{}", classname)


def resolve_templates(value: str | Sequence[str]) -> list[Callable[[str], str]]:
    """Prompt templates as the callables ``open_clip.build_zero_shot_classifier`` accepts.

    open_clip's own templates are callables; user strings use ``{}`` or ``{c}`` and become
    callables too (``str.format`` would choke on ``{c}`` and on any other brace).
    """
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if isinstance(value, str) and value.strip().lower() in ("openai", "simple"):
        return list(OPENAI_IMAGENET_TEMPLATES if value.strip().lower() == "openai" else SIMPLE_IMAGENET_TEMPLATES)
    templates = _read_list(value, "|") if isinstance(value, str) else [str(t) for t in value]
    if not templates:
        raise UserError("the zero-shot template list is empty")
    for template in templates:
        if "{}" not in template and "{c}" not in template:
            raise UserError(f"zero-shot template {template!r} has no {{}} (or {{c}}) for the class name")
    return [partial(_fill_template, t) for t in templates]


def _open_zero_shot(task: ZeroShotTask) -> _ZeroShotSet:
    root = Path(task.path)
    if root.is_dir():
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not folders:
            raise UserError(f"zero-shot set {task.name}: {root} has no class folders")
        default = [f.replace("_", " ") for f in folders]
        if task.classnames is None and len(folders) == 1000 and all(_WNID.match(f) for f in folders):
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            default = list(IMAGENET_CLASSNAMES)
        classnames = resolve_classnames(task.classnames, default)
        if len(classnames) != len(folders):
            raise UserError(f"zero-shot set {task.name}: {len(folders)} class folders but {len(classnames)} class names")
        paths, labels = [], []
        for label, folder in enumerate(folders):
            for file in sorted((root / folder).rglob("*")):
                if file.is_file() and file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
                    paths.append(str(file))
                    labels.append(label)
    elif root.is_file():
        paths, raw_labels = _read_label_table(task, root)
        if all(re.fullmatch(r"\d+", label) for label in raw_labels):
            labels = [int(label) for label in raw_labels]
            if task.classnames is None:
                raise UserError(f"zero-shot set {task.name}: integer labels need class names (classnames=...)")
            classnames = resolve_classnames(task.classnames, [])
            if max(labels) >= len(classnames):
                raise UserError(f"zero-shot set {task.name}: label {max(labels)} but only {len(classnames)} class names")
        else:
            classnames = resolve_classnames(task.classnames, sorted(set(raw_labels)))
            index = {name: i for i, name in enumerate(classnames)}
            unknown = sorted(set(raw_labels) - index.keys())
            if unknown:
                raise UserError(f"zero-shot set {task.name}: label {unknown[0]!r} is not a class name")
            labels = [index[label] for label in raw_labels]
    else:
        raise UserError(f"zero-shot set {task.name}: no such folder or file: {root}")
    if not paths:
        raise UserError(f"zero-shot set {task.name}: no images under {root}")
    return _ZeroShotSet(task, _ImageFiles(paths), np.asarray(labels, dtype=np.int64), classnames,
                        resolve_templates(task.templates))


def _read_label_table(task: ZeroShotTask, path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        first = f.readline()
        f.seek(0)
        delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in first else ","
        reader = csv.DictReader(f, delimiter=delimiter)
        for column in (task.image_column, task.label_column):
            if column not in (reader.fieldnames or []):
                raise UserError(f"zero-shot set {task.name}: {path} has no column {column!r}")
        rows = [(r[task.image_column].strip(), r[task.label_column].strip()) for r in reader]
    return [str(path.parent / p) for p, _ in rows], [label for _, label in rows]


# --- encoding -------------------------------------------------------------------------------


class _ImageFiles:
    """Images given as file paths (zero-shot sets), readable like a :class:`rdkd.data.Dataset`."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.keys = paths

    def __len__(self) -> int:
        return len(self.paths)

    def read_image_bytes(self, i: int) -> bytes:
        try:
            with open(self.paths[i], "rb") as f:
                return f.read()
        except OSError as err:
            raise SampleError(f"image file unreadable: {err.strerror or err}") from None


class _DecodedImages(torch.utils.data.Dataset):
    """Entry i -> (i, uint8 pixels at the model's input size, None) or (i, None, reason),
    in DataLoader workers."""

    def __init__(self, source: Any, to_pixels: Callable):
        self.source = source
        self.to_pixels = to_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | bytes | None, str | None]:
        image, reason = runtime.decode_or_reason(partial(self.source.read_image_bytes, i), self.to_pixels)
        return i, image, reason


def _collate(batch: list) -> tuple[list[int], torch.Tensor | list[bytes] | None, list[tuple[int, str]]]:
    """Entries, their pixels stacked (or their encoded bytes, for the device to decode), the rest's reasons."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, reason) for i, x, reason in batch if x is None]
    if good and isinstance(good[0][1], bytes):
        return [i for i, _ in good], [x for _, x in good], bad
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None), bad


class _EvalEncoder:
    """The model's :class:`rdkd.encoding.Encoder`, fed as evaluate reads: DataLoader workers
    decode image files or dataset entries to uint8 pixels at the model's input size (with
    ``decode="device"`` they hand over the encoded images and the device decodes them),
    captions and class prompts are tokenised in the main process; a progress bar per pass."""

    def __init__(self, loaded: LoadedClip, device: torch.device, config: "EvalConfig",
                 preprocess: str = pixels.DEFAULT_MODE):
        self.encoder = Encoder(loaded, device, config.precision)
        self.device = device
        self.batch_size, self.workers, self.show_progress = config.batch_size, config.workers, config.progress
        self.renderer = pixels.ViewRenderer.of_model(loaded.preprocess, loaded.preprocess_cfg, preprocess)
        self.decoder = pixels.DeviceDecoder(self.renderer, device) if config.decode == "device" else None

    def images(self, source: Any, description: str) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """(embeddings of the readable images, their entry indices, (entry, reason) of the others)."""
        loader = torch.utils.data.DataLoader(
            _DecodedImages(source, self.renderer.eval_pixels if self.decoder is None else pixels.checked_bytes),
            batch_size=self.batch_size, num_workers=self.workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
        )
        chunks, kept, bad = [], [], []
        with runtime.progress(self.show_progress, description, len(source)) as advance:
            for done in self.encoder.stream(self._decoded(loader)):
                indices, rejects = done.tag
                if done.images is not None:
                    chunks.append(done.images)
                    kept.extend(indices)
                bad.extend(rejects)
                advance(len(indices) + len(rejects))
        embeddings = np.concatenate(chunks) if chunks else np.zeros((0, self.encoder.dim), np.float32)
        return embeddings, np.asarray(kept, np.int64), bad

    def _decoded(self, loader: Iterable) -> Iterator[tuple[tuple[list[int], list], torch.Tensor | None, None]]:
        """The loader's batches as the encoder's inputs, tagged (entries, (entry, reason) of
        the rejects); encoded images are decoded on the device here, and those no path
        decodes join the rejects."""
        for indices, images, rejects in loader:
            if isinstance(images, list):
                images, failed = self.decoder.decode(images, [[None]] * len(images))
                if failed:
                    lost = {i for i, _ in failed}
                    rejects = rejects + [(indices[i], reason) for i, reason in failed]
                    images = images[[i for i in range(len(indices)) if i not in lost]]
                    indices = [entry for i, entry in enumerate(indices) if i not in lost]
            yield (indices, rejects), images if indices else None, None

    def texts(self, texts: Sequence[str], description: str) -> np.ndarray:
        """[len(texts), dim] embeddings, in order."""
        batches = (list(texts[start:start + self.batch_size]) for start in range(0, len(texts), self.batch_size))
        chunks = []
        with runtime.progress(self.show_progress, description, len(texts)) as advance:
            for done in self.encoder.stream((len(b), None, self.encoder.tokenizer(b)) for b in batches):
                chunks.append(done.texts)
                advance(done.tag)
        return np.concatenate(chunks) if chunks else np.zeros((0, self.encoder.dim), np.float32)

    def classifier(self, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]) -> torch.Tensor:
        """[classes, dim]: per class the mean of its prompts' embeddings, re-normalised, as
        ``open_clip.build_zero_shot_classifier`` builds it (the same classes a forward), with
        the encoder's precision and normalisation."""
        groups = (classnames[start:start + _CLASSES_PER_FORWARD]
                  for start in range(0, len(classnames), _CLASSES_PER_FORWARD))
        prompts = ((len(g), None, self.encoder.tokenizer([t(c) for c in g for t in templates])) for g in groups)
        rows = []
        for done in self.encoder.stream(prompts):
            mean = torch.from_numpy(done.texts).reshape(done.tag, len(templates), -1).mean(dim=1)
            rows.append(mean / mean.norm(dim=1, keepdim=True))
        return torch.cat(rows)


# --- the eval set ---------------------------------------------------------------------------


@dataclass
class EvalEmbeddings:
    """Row-aligned embeddings of an eval set: one image row per key, captions in key order."""

    keys: list[str]
    images: np.ndarray
    texts: np.ndarray
    text_image: np.ndarray  # image row of each caption row
    skipped: list[dict[str, str]] = field(default_factory=list)

    def subset(self, rows: np.ndarray) -> "EvalEmbeddings":
        """The images ``rows`` (in that order) and their captions."""
        starts = np.searchsorted(self.text_image, rows, side="left")
        stops = np.searchsorted(self.text_image, rows, side="right")
        text_rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(rows) else np.zeros(0, np.int64)
        return EvalEmbeddings([self.keys[r] for r in rows], self.images[rows], self.texts[text_rows],
                              np.repeat(np.arange(len(rows)), stops - starts), self.skipped)


def _from_cache(cache: TeacherCache, keys: Sequence[str] | None) -> tuple[EvalEmbeddings, np.ndarray]:
    """The cache's view-0 image rows and caption rows of ``keys`` (default: all, cache
    order), joined in one :meth:`TeacherCache.lookup`; and where in ``keys`` those found are."""
    if keys is None:
        keys = cache.image_keys(np.arange(0, cache.num_image_rows, cache.views, dtype=np.int64))
    keys = pa.array(keys, pa.large_string())
    rows = cache.lookup(keys)
    found = np.flatnonzero(rows.found)
    skipped = [{"key": key, "reason": "not in the teacher cache (rejected at extraction)"}
               for key in keys.filter(pa.array(~rows.found)).to_pylist()]
    counts = rows.text_count[found].astype(np.int64)
    firsts = np.cumsum(counts) - counts  # where each image's captions start among the rows taken
    text_rows = np.repeat(rows.text_row[found] - firsts, counts) + np.arange(counts.sum())
    images = cache.image_embeddings(rows.image_row[found]).numpy()  # the first view row: the teacher's eval view
    texts = cache.text_embeddings(text_rows).numpy()
    scored = EvalEmbeddings(keys.filter(pa.array(rows.found)).to_pylist(), images, texts,
                            np.repeat(np.arange(len(found)), counts), skipped)
    return scored, found


def _open_cache_for(path: str | Path, dataset, role: str) -> TeacherCache:
    """The cache at ``path``, refused in one line when a file is missing or of another size
    than its manifest says, or when it is of another dataset than the eval set."""
    cache = TeacherCache.open(path)
    cache.require_intact(sizes_only=True)
    if dataset is not None and cache.dataset_fingerprint != dataset.fingerprint:
        raise UserError(
            f"the {role} {path} was built from another dataset than the eval set {dataset.spec.path} "
            f"(dataset fingerprint {cache.dataset_fingerprint[:12]} != {dataset.fingerprint[:12]})"
        )
    return cache


# --- run info -------------------------------------------------------------------------------


def _run_file(spec) -> Path | None:
    """The ``run.json`` of a ``rdkd train-student`` run whose export ``spec`` points into."""
    candidates = [spec.config, spec.pretrained]
    if spec.name and spec.name.startswith("local-dir:"):
        candidates.append(spec.name[len("local-dir:"):])
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if not path.exists():
            continue
        folder = path if path.is_dir() else path.parent
        for place in (folder, folder.parent):
            if (place / RUN_FILE).is_file():
                return place / RUN_FILE
    return None


def _discover_run_info(spec) -> RunLabels | None:
    """The labels of the train-student run ``spec`` was exported by; None when there is
    none (or its run.json is no train-student run's)."""
    path = _run_file(spec)
    try:
        return RunLabels.read(path) if path is not None else None
    except UserError:
        return None


def _preprocess_of(spec, teacher) -> str:
    """How a model's images become pixels here: the teacher cache's way when one is given,
    else that of the cache the student was trained from (its ``run.json``), else exact."""
    if teacher is not None:
        return pixels.mode_of(teacher.manifest)
    path = _run_file(spec)
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        record = {}
    return pixels.mode_of(record if isinstance(record, dict) else {})


def _default_name(model, cache, run_info: dict[str, Any] | None = None) -> str:
    found = _discover_run_info(model) if cache is None else None
    info = {**(found.to_dict() if found is not None else {}),
            **{k: v for k, v in (run_info or {}).items() if v is not None}}
    if info.get("method") and info.get("student"):
        name = f"{info['student']}-{info['method']}" + (f"-seed{info['seed']}" if info.get("seed") is not None else "")
    else:
        name = Path(cache).resolve().name if cache is not None else _model_label(model)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _model_label(spec) -> str:
    """A short name of a model spec: the model name or config stem, and a pretrained tag."""
    base = spec.name or (Path(spec.config).stem if spec.config else "model")
    base = base.split(":", 1)[1].rstrip("/").split("/")[-1] if base.startswith(("local-dir:", "hf-hub:")) else base
    tag = spec.pretrained
    return f"{base}/{tag}" if tag and not Path(tag).exists() else base


def default_output(model=None, cache: str | Path | None = None, name: str | None = None,
                   run_info: dict[str, Any] | None = None) -> Path:
    """``artifacts/eval/<name>/metrics.json``; the name defaults to ``<student>-<method>[-seed<N>]``
    from the run labels, else the cache folder or model name."""
    return runtime.DEFAULT_ARTIFACTS / "eval" / (name or _default_name(model, cache, run_info)) / "metrics.json"


# --- the stage ------------------------------------------------------------------------------


def _zero_shot_tasks(texts: Sequence[str] | None) -> list[ZeroShotTask]:
    return [ZeroShotTask.parse(text) for text in texts or []]


@dataclass
class EvalConfig:
    """What an evaluation is asked to do: ``rdkd evaluate``'s options (by field name) and
    the model, data and labels the command builds; recorded in ``evaluation.json``.
    ``model`` a :class:`rdkd.models.ModelSpec`, or ``cache`` a cache folder to score;
    ``run_info`` the run's labels (``method``, ``student``, ``seed``) where they are given."""

    data: DataSpec | None = None
    model: Any = None
    cache: str | None = option(None, "Score a teacher cache's own rows instead of a model (no recomputation).")
    teacher_cache: str | None = option(None, "Teacher cache of the eval set: adds geometry-fidelity metrics.")
    zeroshot: list[ZeroShotTask] = option(
        ..., "Zero-shot task (repeatable): NAME=PATH[;classnames=imagenet|FILE|a,b,c]"
        "[;templates=openai|simple|FILE|t1{}|t2{}][;label_column=label][;image_column=filepath]. "
        "PATH: image-folder tree or CSV.", factory=list, parse=_zero_shot_tasks, cli_type=Optional[List[str]],
        cli_default=None)
    index_factory: str | None = option(None, "FAISS factory string for very large galleries (e.g. IVF4096,Flat, "
                                             "HNSW32): approximate, no ranks. Default: exact IndexFlatIP.")
    search_params: str | None = option(None, "FAISS search parameters for --index-factory, e.g. nprobe=64 or "
                                             "efSearch=128.")
    ks: tuple[int, ...] = M.DEFAULT_KS
    batch_size: int = option(256, "Encoding batch size.", min=1)
    workers: int = option(4, "DataLoader worker processes for image decoding.", min=0)
    device: str = option("auto", "auto (cuda if present), cpu, cuda, cuda:N.")
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast of the model's forward (fp16 on CUDA only).")
    decode: str = option("workers", pixels.DECODE_HELP)
    seed: int = option(0, "Seed of the fidelity similarity sample.")
    fidelity_k: int = 10
    fidelity_sample: int = option(2000, "Items sampled for the Spearman fidelity correlations.", min=3)
    per_class: bool = option(False, "Also write zero-shot per-class top-1 accuracy CSVs.")
    ranks: bool = option(True, "Exact mean/median rank (a second gallery scan for queries missed in the top K).",
                         "--ranks/--no-ranks")
    run_info: dict[str, Any] | None = None
    progress: bool = option(True, "Show progress bars.", "--progress/--no-progress")

    def check(self) -> None:
        """One line for options that cannot go together (before anything is opened)."""
        if (self.model is None) == (self.cache is None):
            raise UserError("evaluate needs exactly one of a model or --cache")
        if self.data is None and self.cache is None and not self.zeroshot:
            raise UserError("nothing to evaluate: give an eval dataset (--data) and/or zero-shot tasks (--zeroshot)")
        if self.cache is not None and self.zeroshot:
            raise UserError("zero-shot classification needs a model (a cache has no text encoder for class prompts)")
        if self.teacher_cache is not None and self.data is None:
            raise UserError("--teacher-cache needs the eval dataset (--data) it was extracted from")
        if any(k < 1 for k in self.ks):
            raise UserError("recall cut-offs K must be positive")
        if len({t.name for t in self.zeroshot}) != len(self.zeroshot):
            raise UserError("zero-shot task names must be distinct")
        pixels.check_decode(self.decode)


@dataclass
class _Inputs:
    """What an evaluation reads, opened and checked before any encoding."""

    device: torch.device
    faiss_gpu: bool
    dataset: Any
    scored_cache: Any
    teacher: Any
    zero_shot_sets: list
    loaded: Any
    encoder: Any

    @property
    def dim(self) -> int:
        return self.loaded.embed_dim if self.loaded is not None else self.scored_cache.dim


def evaluate(out: str | Path | None = None, **options: Any) -> dict[str, float]:
    """Score a model or a cache; return and write the metrics.

    ``options`` are the fields of :class:`EvalConfig`. See the module docstring for what is
    measured and written. ``out`` defaults to ``artifacts/eval/<name>/metrics.json``.
    ``ranks=False`` skips mean/median rank, whose exact count scans the gallery again for
    every query whose match is not in its top K.
    """
    config = EvalConfig(**options)
    for name in ("cache", "teacher_cache"):
        if getattr(config, name) is not None:
            setattr(config, name, str(getattr(config, name)))
    config.check()
    out = Path(out) if out is not None else default_output(config.model, config.cache, run_info=config.run_info)
    inputs = _open_inputs(config)
    results, per_class_tables, skipped = _score(config, inputs)
    info = _evaluation_info(config, inputs)
    if skipped is not None:
        info["skipped"] = skipped
    if inputs.encoder is not None and inputs.encoder.decoder is not None:  # --decode device: CPU-path decodes
        info["device_decode_fallbacks"] = inputs.encoder.decoder.fallbacks
    run = _run_labels(config.model, inputs.scored_cache, config.run_info, inputs.dim)
    results = {name: M.as_written(value) for name, value in results.items()}
    atomic_write_json(out, results)
    atomic_write_json(out.parent / EVALUATION_INFO, info)
    atomic_write_json(out.parent / LABELS_FILE, run.to_dict())
    if config.per_class:
        for name, rows in per_class_tables.items():
            atomic_write_csv(out.parent / f"zeroshot_{name}_per_class.csv", ["class", "top1"], rows)
    return results


def _open_inputs(config: EvalConfig) -> _Inputs:
    """Everything that can be wrong with the input, checked before any encoding."""
    dev = runtime.resolve_device(config.device)
    runtime.check_precision(config.precision, dev)
    dataset = open_dataset(config.data) if config.data is not None else None
    scored_cache = _open_cache_for(config.cache, dataset, "cache") if config.cache is not None else None
    teacher = (_open_cache_for(config.teacher_cache, dataset, "teacher cache")
               if config.teacher_cache is not None else None)
    zero_shot_sets = [_open_zero_shot(task) for task in config.zeroshot]
    loaded = encoder = None
    if config.model is not None:
        from rdkd.models import load_clip

        loaded = load_clip(config.model, device=dev)
        encoder = _EvalEncoder(loaded, dev, config, _preprocess_of(config.model, teacher))
    inputs = _Inputs(dev, dev.type == "cuda" and faiss.get_num_gpus() > 0, dataset, scored_cache, teacher,
                     zero_shot_sets, loaded, encoder)
    if config.index_factory:
        M.check_index_factory(config.index_factory, inputs.dim)
    return inputs


def _evaluation_info(config: EvalConfig, inputs: _Inputs) -> dict[str, Any]:
    """What was scored and how (``evaluation.json``): no timings, the same bytes every run."""
    model, loaded, data = config.model, inputs.loaded, config.data
    return {
        "model": model.to_dict() if model is not None else None,
        "model_info": {k: v for k, v in loaded.info.items() if k != "model_config"} if loaded else None,
        "cache": config.cache,
        "data": asdict(data) if data is not None else None,
        "dataset_fingerprint": inputs.dataset.fingerprint if inputs.dataset is not None else None,
        "teacher_cache": config.teacher_cache,
        "teacher_cache_id": inputs.teacher.cache_id if inputs.teacher is not None else None,
        "index_factory": config.index_factory or "Flat", "search_params": config.search_params,
        "device": str(inputs.device), "precision": config.precision, "faiss_gpu": inputs.faiss_gpu,
        "seed": config.seed, "ks": list(config.ks),
        # absent means exact: older files keep their bytes
        **({pixels.MANIFEST_FIELD: inputs.encoder.renderer.mode}
           if inputs.encoder is not None and inputs.encoder.renderer.mode != "exact" else {}),
    }


def _score(config: EvalConfig, inputs: _Inputs) -> tuple[dict[str, float], dict[str, list], list | None]:
    """(metrics, zero-shot per-class tables, skipped samples of the retrieval set or None)."""
    results: dict[str, float] = {}
    skipped = None
    if inputs.dataset is not None or inputs.scored_cache is not None:
        if inputs.scored_cache is not None:  # without a dataset: every image of the cache
            keys = inputs.dataset.keys if inputs.dataset is not None else None
            scored, _ = _from_cache(inputs.scored_cache, keys)
        else:
            scored = _encode_eval_set(inputs.encoder, inputs.dataset)
        skipped = scored.skipped
        queries = len(np.unique(scored.text_image)) + len(scored.texts)
        with runtime.progress(config.progress, "retrieval", queries) as advance:
            retrieval = M.retrieval_metrics(
                scored.images, scored.texts, scored.text_image, ks=config.ks, index_factory=config.index_factory,
                use_gpu=inputs.faiss_gpu, search_params=config.search_params, with_ranks=config.ranks,
                device=inputs.device, progress=advance,
            )
        results.update({f"retrieval/{k}": v for k, v in retrieval.items()})
        results["retrieval/images"] = float(len(scored.images))
        results["retrieval/captions"] = float(len(scored.texts))
        results["retrieval/skipped"] = float(len(scored.skipped))
        if inputs.teacher is not None:
            results.update(_fidelity(config, inputs, scored))
    per_class_tables: dict[str, list[tuple[str, float]]] = {}
    for zs in inputs.zero_shot_sets:
        zs_metrics, per_class_acc = _zero_shot(inputs.encoder, zs)
        results.update({f"zeroshot/{zs.task.name}/{k}": v for k, v in zs_metrics.items()})
        per_class_tables[zs.task.name] = list(zip(zs.classnames, per_class_acc.tolist()))
    return results, per_class_tables, skipped


def _fidelity(config: EvalConfig, inputs: _Inputs, scored: "EvalEmbeddings") -> dict[str, float]:
    """Fidelity of the scored embeddings to the teacher cache's rows of the same items."""
    reference, found = _from_cache(inputs.teacher, scored.keys)
    student = scored.subset(found)
    if not np.array_equal(student.text_image, reference.text_image):
        raise UserError(f"teacher cache {config.teacher_cache} holds other captions than the eval set")
    fidelity = M.fidelity_metrics(student.images, student.texts, reference.images, reference.texts,
                                  reference.text_image, k=config.fidelity_k, sample_size=config.fidelity_sample,
                                  seed=config.seed, use_gpu=inputs.faiss_gpu)
    return {**{f"fidelity/{k}": v for k, v in fidelity.items()}, "fidelity/images": float(len(reference.keys))}


def _encode_eval_set(encoder: _EvalEncoder, dataset) -> EvalEmbeddings:
    images, kept, bad = encoder.images(dataset, "encoding images")
    order = np.argsort(kept)  # DataLoader keeps order; sort anyway so rows follow the dataset
    images, kept = images[order], kept[order]
    captions = [list(dataset.captions(int(i))) for i in kept]
    texts = [c for cs in captions for c in cs]
    text_embeddings = encoder.texts(texts, "encoding captions")
    skipped = [{"key": dataset.keys[i], "source": dataset.source(i), "reason": reason} for i, reason in bad]
    skipped += [{"key": r.key, "source": r.source, "reason": r.reason} for r in dataset.index_rejects]
    return EvalEmbeddings([dataset.keys[int(i)] for i in kept], images, text_embeddings,
                          np.repeat(np.arange(len(kept)), [len(c) for c in captions]), skipped)


def _zero_shot(encoder: _EvalEncoder, zs: _ZeroShotSet) -> tuple[dict[str, float], np.ndarray]:
    classifier = encoder.classifier(zs.classnames, zs.templates)
    images, kept, bad = encoder.images(zs.images, f"zero-shot {zs.task.name}")
    if len(kept) == 0:
        raise UserError(f"zero-shot set {zs.task.name}: no readable image")
    result, per_class = M.zero_shot_metrics(images, classifier, zs.labels[kept])
    result["images"] = float(len(kept))
    result["skipped"] = float(len(bad))
    return result, per_class


def _run_labels(model, cache, run_info: dict[str, Any] | None, embed_dim: int) -> RunLabels:
    """A cache is labelled as its teacher; a model by its training run's run.json, else as
    an open_clip model; labels the command gives win."""
    if cache is not None:
        teacher = cache.manifest.get("teacher", {})
        spec = teacher.get("spec") if isinstance(teacher, dict) else None
        name = (spec or {}).get("name") or (spec or {}).get("config") or "teacher"
        labels = RunLabels(method="teacher", student=str(name))
    else:
        labels = _discover_run_info(model) or RunLabels(method="open_clip", student=_model_label(model))
    return labels.given(**(run_info or {}), embed_dim=int(embed_dim))


