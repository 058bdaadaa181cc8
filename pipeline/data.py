"""Dataset readers shared by every stage: open_clip CSV/TSV, webdataset tar shards, Parquet.

A dataset is opened into a columnar *index*: keys, captions and where each image's bytes
live (a tar member offset, a Parquet row, a file path), held in Arrow and numpy arrays, with
no Python object per entry. No image bytes are read while indexing; images are read and
decoded later, one at a time, in DataLoader workers.

How an index is built:

1. Every *unit* of the dataset (a tar shard, the CSV file, a Parquet file) is scanned on its
   own into a table of *candidates* in file order: key, a problem that rules the sample out
   (or null), its usable captions, the reasons its other captions were dropped, and where
   its image is. Scanning is the only per-sample Python; units are scanned in parallel
   processes when there are many, and every scan is kept in the *index cache*, so a second
   open reads one table per unit instead of scanning again.
2. One builder, the same for all formats, turns the candidates into the index with array
   operations (Arrow dictionary encoding of the keys): a candidate with a problem is
   rejected with it; of the candidates of one key that have a usable caption the first is
   kept and the later ones are ``duplicate key``; a candidate without a usable caption is
   rejected with the reason its first caption was dropped (``empty caption`` when it had
   none), or as ``duplicate key`` when an earlier candidate of its key was kept. Rejects
   are listed in candidate order.

Index cache: one Arrow IPC file per unit, ``<unit name>.<reader digest>.<state digest>.arrow``
(the reader digest covers the unit's absolute path, the scanner and its options; the state
digest its size, mtime and ctime), in a folder ``.rdkd-index/`` beside the unit when that is
writable, else in ``$XDG_CACHE_HOME/rdkd/index`` (``~/.cache/rdkd/index``).
``RDKD_INDEX_CACHE=<folder>`` keeps every entry in that folder, ``RDKD_INDEX_CACHE=off``
turns the cache off. A unit whose size, mtime or ctime changed is scanned again and its
stale entry replaced. Under torchrun (a process group is running) :func:`open_dataset` is
collective: rank 0 opens first and fills the cache, then the first rank of every other node,
then the other ranks, which read the cache instead of scanning.

Conventions (what each format means by "one image with several captions" and by "key"):

- **CSV/TSV** (open_clip's ``CsvDataset`` layout): one row per (image path, caption).
  Rows that name the same image path are one entry with several captions, in file order
  (COCO/Flickr style), never a duplicated image. Paths are relative to the CSV file's
  folder. The key is the ``key_column`` if given, else the first 32 hex digits of the
  sha256 of the image path as written in the file (normalised), so it survives moving the
  dataset folder.
- **webdataset** (as img2dataset writes it): members ``KEY.jpg|jpeg|png|webp``,
  ``KEY.txt``, optional ``KEY.json``; the key is webdataset's ``__key__`` (the member name
  up to the first dot of its base name). ``KEY.txt`` holds one caption per non-empty line:
  img2dataset writes a single line, and several captions of one image (COCO-style, as
  clip_benchmark's webdataset conversions do) go on separate lines. ``KEY.json`` is not
  read. Shards may be given as a brace pattern (``shards/{00000..00099}.tar``), one
  ``.tar`` file, or a folder of ``.tar`` files (sorted by name).
- **Parquet** (a file, a brace pattern of files, or a folder searched recursively for
  ``*.parquet``): one row per image, an image-bytes
  column (binary, or a struct with a ``bytes`` field as Hugging Face ``datasets`` writes
  images) and a caption column (a string, or a list of strings for several captions).
  The key is the ``key_column`` if given, else a ``key`` column when the file has one
  (img2dataset's), else the row-derived ``<file path in the folder, no suffix>:<row>``: stable while the files are
  unchanged, and free (a content hash would need every image read at indexing time).

Bad samples: problems visible from the index (duplicate key, empty or non-UTF-8 caption,
broken tar member) are *index rejects*; problems that need the image bytes (missing or
empty file, truncated or non-image bytes, huge image) surface as :class:`SampleError`
from :meth:`Dataset.read_image_bytes` / :func:`decode_image`, so indexing stays cheap.

The fingerprint (``rdkd-dataset-v2``) is the sha256 of the format and of the fingerprints
of the units in order; a unit's fingerprint is the sha256 of its candidates' keys,
problems, captions and dropped-caption reasons (their lengths and UTF-8 bytes), computed
where the unit is scanned and kept in the index cache. Image bytes are not hashed: at
LAION scale that is a full read of tens of terabytes; keys (which img2dataset derives from
shard and position) and captions identify the data well enough to refuse a cache built
from a different dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import operator
import os
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from rdkd.errors import SampleError, UserError
from rdkd.files import atomic_write_bytes
from rdkd.options import option

FORMATS = ("auto", "csv", "webdataset", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Tar read buffer of a sequential pass (iter_samples): one pass over the shard, in large reads.
TAR_READ_BUFFER_BYTES = 1 << 20
# 2**27 pixels (e.g. 11585 x 11585) is far above any training image and far below what
# exhausts memory when decoded (3 bytes per pixel: ~400 MB).
DEFAULT_MAX_PIXELS = 2**27
# Below this many units or this much data to scan, starting scan processes (a second or so:
# imports) costs more than it saves. A unit's scan costs per sample, not per byte, so many
# small shards (small images) count too.
PARALLEL_SCAN_MIN_UNITS = 8
PARALLEL_SCAN_MIN_BYTES = 64 * 2**20
# The index cache (see the module docstring). Bump SCAN_VERSION when what a scan yields
# changes: entries of other versions are then ignored.
INDEX_CACHE_ENV = "RDKD_INDEX_CACHE"
INDEX_CACHE_FOLDER = ".rdkd-index"
SCAN_VERSION = 1
PARQUET_IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
PARQUET_CAPTION_COLUMNS = ("title", "caption", "text", "txt")

# Reasons recorded in reject rows; stages count by reason, so keep the wording fixed.
DUPLICATE_KEY = "duplicate key"
EMPTY_CAPTION = "empty caption"
CAPTION_NOT_UTF8 = "caption not UTF-8"
BROKEN_TAR_MEMBER = "broken tar member"
NO_IMAGE = "no image in sample"
NO_CAPTION = "no caption in sample"
MALFORMED_ROW = "malformed CSV row"
EMPTY_PATH = "empty image path"

# Separators as people type them on a command line.
SEPARATOR_NAMES = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset is and how to read it.

    ``format`` is ``csv``, ``webdataset``, ``parquet`` or ``auto`` (by suffix: ``.csv`` /
    ``.tsv``, ``.tar`` or a brace pattern, ``.parquet``, or a folder of ``.tar`` or
    ``.parquet`` files). For Parquet, ``image_column`` and ``caption_column`` left at their
    CSV defaults mean "the first of ``image``/``jpg``/``png``/``webp``" and "the first of
    ``title``/``caption``/``text``/``txt``" present in the file.
    """

    path: str = option(..., "Dataset: CSV/TSV, webdataset shards (.tar, brace pattern) or Parquet.", "--data")
    format: str = option("auto", "csv, webdataset, parquet or auto (by suffix).", "--data-format")
    image_column: str = option("filepath", "CSV: image path column; Parquet: image bytes column.")
    caption_column: str = option("title", "Caption column (CSV/Parquet).")
    key_column: str | None = option(None, "Sample key column (default: derived from the image path).")
    separator: str = option("\t", "CSV field separator: a character, or tab / comma.")

    def resolved_format(self) -> str:
        """The concrete format: ``format`` itself, or the one ``auto`` infers from ``path``."""
        if self.format not in FORMATS:
            raise UserError(f"unknown dataset format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.format != "auto":
            return self.format
        path = str(self.path)
        lower = path.lower()
        if lower.endswith(".parquet"):  # one file or a brace pattern of files
            return "parquet"
        if "{" in path or lower.endswith(".tar"):
            return "webdataset"
        if lower.endswith((".csv", ".tsv")):
            return "csv"
        folder = Path(path)
        if folder.is_dir():
            if any(folder.rglob("*.parquet")):
                return "parquet"
            if any(folder.glob("*.tar")):
                return "webdataset"
            raise UserError(f"dataset folder {path} holds no .parquet or .tar files; pass --data-format")
        if not folder.exists():
            raise UserError(f"dataset not found: {path}")
        raise UserError(f"cannot tell the format of dataset {path} from its name; pass --data-format")


@dataclass(frozen=True)
class Reject:
    """One entry dropped from a dataset, for the rejects table."""

    key: str
    source: str
    reason: str


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an RGB PIL image, or raise :class:`SampleError`.

    CMYK, greyscale, palette and 16-bit images are converted to RGB; images with an alpha
    channel are composited onto white (what a viewer shows, rather than the undefined
    colour of fully transparent pixels). EXIF orientation is not applied, as in open_clip's
    own data loaders. Images above ``max_pixels`` are refused from the header alone,
    before any pixel is decoded.
    """
    return load_image(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image's header read, no pixel decoded yet (size, mode; a JPEG may still be told
    to decode at reduced size with ``draft``), or :class:`SampleError`. Finish with
    :func:`load_image`; :func:`decode_image` is both."""
    if not data:
        raise SampleError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise SampleError(f"image too large: {err}") from None
    except UnidentifiedImageError:
        raise SampleError("not an image") from None
    except Exception as err:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...) on bad bytes
        raise SampleError(f"truncated or corrupt image: {err or type(err).__name__}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(f"image too large: {width}x{height} pixels (limit {max_pixels})")
    return image


def load_image(image: Image.Image) -> Image.Image:
    """The pixels of an image from :func:`open_image`, as RGB (:func:`to_rgb`), or :class:`SampleError`."""
    try:
        image.load()
    except Exception as err:  # as in open_image: PIL's decoders raise many types
        raise SampleError(f"truncated or corrupt image: {err or type(err).__name__}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: PIL's convert clips at 255, so rescale to 8 bits first.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size else 0.0
        scale = 255.0 / peak if peak > 255 else 1.0
        image = Image.fromarray((array * scale).clip(0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class Keys(Sequence[str]):
    """The keys of a dataset in order, held as one Arrow string array (no ``str`` per entry).

    A read-only sequence: ``keys[i]``, slices (a ``Keys``), iteration, ``len``, ``in``, and
    ``==`` against another ``Keys`` or a list or tuple of str. Vectorised code takes the
    Arrow array itself: ``keys.arrow``, or ``pa.array(keys)``.
    """

    __slots__ = ("arrow",)
    __hash__ = None  # mutable-sequence semantics for ==, as a list

    def __init__(self, arrow: pa.Array):
        self.arrow = arrow

    def __len__(self) -> int:
        return len(self.arrow)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Keys(self.arrow[i])
        return self.arrow[operator.index(i)].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.arrow), 1 << 16):  # a batch of str at a time, not all at once
            yield from self.arrow.slice(start, 1 << 16).to_pylist()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(pc.any(pc.equal(self.arrow, key)).as_py())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Keys):
            return self.arrow.equals(other.arrow)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.arrow.to_pylist() == list(other)
        return NotImplemented

    def __arrow_array__(self, type: pa.DataType | None = None) -> pa.Array:
        return self.arrow if type is None or type == self.arrow.type else self.arrow.cast(type)

    def __repr__(self) -> str:
        shown = self.arrow.slice(0, 3).to_pylist()
        return f"Keys({len(self)} keys: {', '.join(map(repr, shown))}{', ...' if len(self) > 3 else ''})"


class Dataset:
    """An opened dataset: a columnar index of entries (one per image) and lazy access to images.

    Picklable and cheap to pickle (Arrow and numpy buffers, no per-entry objects): open
    file handles are per process, created on first read and dropped when pickled
    (DataLoader workers each open their own).
    """

    format: str
    _per_process_state: tuple[str, ...] = ()  # attributes not pickled: file handles, read caches

    def __init__(self, spec: DataSpec, scanner: Callable, units: list[str], options: list[dict],
                 workers: int | None, cpu_share: int):
        self.spec = spec
        self._units = units
        scans = _scan_units(scanner, units, options, workers, cpu_share)
        self._unit_meta = [meta for _, meta in scans]
        index = _build_index([table for table, _ in scans], self._source_of)
        self.keys = Keys(_array(index.entries.column("key")))
        self._captions = _array(index.entries.column("captions"))
        # where each entry's image is: the scanner's location columns, numeric ones as numpy
        self._locations = {
            name: _array(index.entries.column(name)) for name in index.entries.column_names
            if name not in ("key", "captions")
        }
        for name, column in self._locations.items():
            if pa.types.is_integer(column.type):
                self._locations[name] = column.to_numpy()
        self._unit = index.unit
        self._unit_ranges = index.ranges
        self.index_rejects = index.rejects
        self.caption_drops = index.drops
        self.fingerprint = _fingerprint(self.format, [meta["fingerprint"] for meta in self._unit_meta])
        # the scans and the builder's copies are freed now: give their pages back at once, not
        # at the allocator's leisure (it would keep ~3x the index resident)
        del scans, index
        pa.default_memory_pool().release_unused()

    def __len__(self) -> int:
        return len(self.keys)

    def captions(self, i: int) -> tuple[str, ...]:
        """All captions of entry ``i``, in dataset order."""
        return tuple(self._captions[i].as_py())

    def source(self, i: int) -> str:
        """The file (CSV), shard (webdataset) or file and row (Parquet) entry ``i`` came from."""
        location = {name: column[i] for name, column in self._locations.items()}
        location = {name: value.as_py() if isinstance(value, pa.Scalar) else int(value)
                    for name, value in location.items()}
        return self._source_of(int(self._unit[i]), location)

    def _source_of(self, unit: int, location: dict) -> str:
        """The source of a candidate of ``unit`` with the scanner's ``location`` fields."""
        raise NotImplementedError

    @property
    def shard_ranges(self) -> list[range] | None:
        """One range of entry indices per data shard (webdataset only), in order."""
        return None

    @property
    def num_captions(self) -> int:
        return len(self._captions.flatten())

    def read_image_bytes(self, i: int) -> bytes:
        """The raw bytes of entry ``i``'s image; raises :class:`SampleError` if unreadable."""
        raise NotImplementedError

    def read_image(self, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Entry ``i``'s image decoded to RGB; raises :class:`SampleError`."""
        return decode_image(self.read_image_bytes(i), max_pixels=max_pixels)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in self._per_process_state:
            state[name] = None
        return state


class CsvDataset(Dataset):
    format = "csv"

    def __init__(self, spec: DataSpec, cpu_share: int = 1):
        path = Path(spec.path)
        if not path.is_file():
            raise UserError(f"dataset not found: {spec.path}")
        separator = SEPARATOR_NAMES.get(spec.separator, spec.separator)
        if len(separator) != 1:
            raise UserError(f"CSV separator must be one character (or tab, comma), not {spec.separator!r}")
        self._root = path.parent
        self._file = str(path)
        options = {"separator": separator, "image_column": spec.image_column,
                   "caption_column": spec.caption_column, "key_column": spec.key_column}
        super().__init__(spec, _scan_csv, [str(path)], [options], 0, cpu_share)
        self._paths = self._locations["path"]

    def _source_of(self, unit: int, location: dict) -> str:
        return str(self._root / location["path"]) if location["path"] is not None else self._file

    def read_image_bytes(self, i: int) -> bytes:
        path = os.path.join(self._root, self._paths[i].as_py())
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise SampleError("image file not found") from None
        except OSError as err:
            raise SampleError(f"image file unreadable: {err.strerror or err}") from None


class WebDataset(Dataset):
    format = "webdataset"
    _per_process_state = ("_open_shard",)

    def __init__(self, spec: DataSpec, workers: int | None = None, cpu_share: int = 1):
        shards = expand_shards(spec.path)
        super().__init__(spec, _scan_tar, shards, [{}] * len(shards), workers, cpu_share)
        self._offsets, self._sizes = self._locations["offset"], self._locations["size"]
        self._open_shard: tuple[int, int] | None = None  # (shard, file descriptor), per process

    @property
    def shard_ranges(self) -> list[range]:
        return list(self._unit_ranges)

    def _source_of(self, unit: int, location: dict) -> str:
        return self._units[unit]

    def read_image_bytes(self, i: int) -> bytes:
        shard = int(self._unit[i])
        opened = self._open_shard
        if opened is None or opened[0] != shard:
            try:
                opened = (shard, os.open(self._units[shard], os.O_RDONLY))
            except OSError as err:
                raise SampleError(f"tar shard unreadable: {err.strerror or err}") from None
            if self._open_shard is not None:
                os.close(self._open_shard[1])
            self._open_shard = opened
        size = int(self._sizes[i])
        # pread: one system call, no file position to keep between reads.
        data = os.pread(opened[1], size, int(self._offsets[i]))
        if len(data) != size:
            raise SampleError(f"{BROKEN_TAR_MEMBER}: image member truncated")
        return data


class ParquetDataset(Dataset):
    format = "parquet"
    _per_process_state = ("_files_open", "_row_group_cache")

    def __init__(self, spec: DataSpec, workers: int | None = None, cpu_share: int = 1):
        path = Path(spec.path)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*.parquet"))
            if not files:
                raise UserError(f"dataset folder {spec.path} holds no .parquet files")
        else:
            files = list(braceexpand.braceexpand(str(spec.path)))
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise UserError(f"dataset not found: {missing[0]}")
        options = [{"image_column": spec.image_column, "caption_column": spec.caption_column,
                    "key_column": spec.key_column,
                    # row-derived keys name the file by its path in the folder
                    "stem": str(Path(f).relative_to(path).with_suffix("")) if path.is_dir() else Path(f).stem}
                   for f in files]
        super().__init__(spec, _scan_parquet, files, options, workers, cpu_share)
        image_columns = {meta["image_column"] for meta in self._unit_meta}
        if len(image_columns) > 1:
            raise UserError(f"Parquet files of {spec.path} disagree on the image column")
        self._image_column = image_columns.pop()
        self._files_open: dict | None = None
        self._row_group_cache: tuple | None = None

    def _source_of(self, unit: int, location: dict) -> str:
        return f"{self._units[unit]}#{location['row']}"

    def read_image_bytes(self, i: int) -> bytes:
        import pyarrow.parquet as pq

        file_index, group, within = int(self._unit[i]), int(self._locations["row_group"][i]), \
            int(self._locations["within"][i])
        cached = self._row_group_cache
        if cached is None or cached[0] != (file_index, group):
            if self._files_open is None:
                self._files_open = {}
            pf = self._files_open.get(file_index)
            if pf is None:
                pf = self._files_open[file_index] = pq.ParquetFile(self._units[file_index], memory_map=True)
            # One row group of the image column at a time: workers read consecutive indices,
            # so the group is reused for the next images and memory stays at one group.
            column = pf.read_row_group(group, columns=[self._image_column]).column(0)
            cached = self._row_group_cache = ((file_index, group), column)
        value = cached[1][within].as_py()
        if isinstance(value, dict):  # Hugging Face datasets Image feature: {"bytes", "path"}
            value = value.get("bytes")
        if value is None:
            raise SampleError("empty image file")
        return bytes(value)


def open_dataset(spec: DataSpec, workers: int | None = None) -> Dataset:
    """Index a dataset (captions and image locations; no image bytes are read).

    ``workers``: processes that scan units (tar shards, Parquet files) not yet in the index
    cache (tarfile parses every member header in Python, the cost of indexing CC3M-size
    shard sets). None: one per CPU (shared among torchrun's local ranks that scan at the
    same time), up to 16, for 8+ units or 2+ units holding 64 MiB or more; 0 or 1: in this
    process.

    Under a running torch.distributed process group this is collective (every rank must
    call it): rank 0 opens first and fills the index cache, then the first local rank of
    every other node, then the rest, so a dataset is scanned once, not once per rank.
    """
    fmt = spec.resolved_format()

    def opened(cpu_share: int) -> Dataset:
        if fmt == "csv":
            return CsvDataset(spec, cpu_share=cpu_share)
        if fmt == "webdataset":
            return WebDataset(spec, workers=workers, cpu_share=cpu_share)
        return ParquetDataset(spec, workers=workers, cpu_share=cpu_share)

    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    dist = sys.modules.get("torch.distributed")  # a process group needs torch imported already
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return opened(cpu_share=local_ranks)
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dataset, failure = None, None
    for my_turn in (rank == 0, rank != 0 and local_rank == 0):
        if my_turn:  # alone on its node: may use every CPU
            try:
                dataset = opened(cpu_share=1)
            except Exception as err:  # raised after the barrier, so the other ranks do not wait forever
                failure = err
        dist.barrier()
    if failure is not None:
        raise failure
    return dataset if dataset is not None else opened(cpu_share=local_ranks)


# --- the shared index builder ---------------------------------------------------------------


# What every scanner yields per candidate, before its own location columns.
_CANDIDATE_SCHEMA = pa.schema([
    pa.field("key", pa.large_string(), nullable=False),
    pa.field("problem", pa.large_string()),  # null: none
    pa.field("captions", pa.large_list(pa.large_string()), nullable=False),  # usable, cleaned
    pa.field("dropped", pa.large_list(pa.large_string()), nullable=False),  # reasons, in caption order
])


class _Candidates:
    """The candidates of one unit, collected by a scanner in file order, then one Arrow table."""

    def __init__(self, **locations: pa.DataType):
        self.locations = locations
        self.columns: dict[str, list] = {name: [] for name in _CANDIDATE_SCHEMA.names + list(locations)}

    def add(self, key: str, problem: str | None = None, captions: Sequence[str] = (),
            dropped: Sequence[str] = (), **location) -> int:
        """Append one candidate; its index (scanners may append captions to it later)."""
        columns = self.columns
        columns["key"].append(key)
        columns["problem"].append(problem)
        columns["captions"].append(list(captions))
        columns["dropped"].append(list(dropped))
        for name in self.locations:
            columns[name].append(location.get(name))
        return len(columns["key"]) - 1

    def table(self) -> pa.Table:
        schema = pa.schema(list(_CANDIDATE_SCHEMA) + [pa.field(n, t) for n, t in self.locations.items()])
        return pa.Table.from_pydict(self.columns, schema=schema)


@dataclass
class _Index:
    entries: pa.Table  # the kept candidates: key, captions and the location columns
    unit: np.ndarray  # int32, the unit of each entry
    ranges: list[range]  # entries of each unit
    rejects: list[Reject]
    drops: list[Reject]


def _build_index(tables: list[pa.Table], source_of: Callable[[int, dict], str]) -> _Index:
    """Keep, reject and dedupe the candidates of all units (see the module docstring).

    Array work over all candidates; Python objects only for the rejected ones and for the
    caption drops of kept ones.
    """
    table = pa.concat_tables(tables)
    n = table.num_rows
    unit = np.repeat(np.arange(len(tables), dtype=np.int32), [t.num_rows for t in tables])
    has_problem = table.column("problem").is_valid().to_numpy()
    usable = ~has_problem & (pc.list_value_length(table.column("captions")).to_numpy() > 0)
    encoded = pc.dictionary_encode(_array(table.column("key")))
    key_id = encoded.indices.to_numpy(zero_copy_only=False)
    position = np.arange(n)
    first_usable = np.full(len(encoded.dictionary), n, dtype=np.int64)  # per key: first usable candidate
    usable_at = np.flatnonzero(usable)
    ids, first = np.unique(key_id[usable_at], return_index=True)
    first_usable[ids] = usable_at[first]
    kept = usable & (first_usable[key_id] == position)
    earlier_kept = first_usable[key_id] < position

    rejected = np.flatnonzero(~kept)
    rejects = []
    for i, row in zip(rejected, table.take(rejected).to_pylist()):
        if row["problem"] is not None:
            reason = row["problem"]
        elif earlier_kept[i]:
            reason = DUPLICATE_KEY
        else:
            reason = row["dropped"][0] if row["dropped"] else EMPTY_CAPTION
        rejects.append(Reject(row["key"], source_of(int(unit[i]), row), reason))
    with_drops = np.flatnonzero(kept & (pc.list_value_length(table.column("dropped")).to_numpy() > 0))
    drops = [Reject(row["key"], source_of(int(unit[i]), row), reason)
             for i, row in zip(with_drops, table.take(with_drops).to_pylist()) for reason in row["dropped"]]

    kept_columns = table.drop_columns(["problem", "dropped"])
    entries = (kept_columns if kept.all() else kept_columns.filter(pa.array(kept))).combine_chunks()
    entry_unit = unit[kept]
    stops = np.cumsum(np.bincount(entry_unit, minlength=len(tables)))
    starts = np.concatenate([[0], stops[:-1]])
    return _Index(entries, entry_unit, [range(int(a), int(b)) for a, b in zip(starts, stops)], rejects, drops)


def _array(column: pa.ChunkedArray) -> pa.Array:
    """A column as one Arrow array (no copy when it already is one chunk)."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _unit_fingerprint(table: pa.Table) -> str:
    """sha256 of a unit's candidates: per column, validity, lengths and UTF-8 bytes."""
    digest = hashlib.sha256(b"rdkd-index-unit-v1\0")
    for name in _CANDIDATE_SCHEMA.names:
        column = _array(table.column(name))
        if pa.types.is_large_list(column.type):
            digest.update(_lengths(column).tobytes())
            column = column.flatten()
        digest.update(np.packbits(column.is_valid().to_numpy(zero_copy_only=False)).tobytes())
        offsets = _offsets(column)
        digest.update(np.diff(offsets).tobytes())
        if len(column):
            digest.update(memoryview(column.buffers()[2])[offsets[0]:offsets[-1]])
    return digest.hexdigest()


def _offsets(array: pa.Array) -> np.ndarray:
    """The int64 offsets of a large string or large list array (its own slice of them)."""
    if len(array) == 0:
        return np.zeros(1, dtype=np.int64)
    return np.frombuffer(array.buffers()[1], dtype="<i8", count=len(array) + 1, offset=array.offset * 8)


def _lengths(array: pa.Array) -> np.ndarray:
    return np.diff(_offsets(array))


def _fingerprint(fmt: str, unit_fingerprints: Sequence[str]) -> str:
    digest = hashlib.sha256(f"rdkd-dataset-v2\0{fmt}\0".encode())
    for unit_fingerprint in unit_fingerprints:
        digest.update(bytes.fromhex(unit_fingerprint))
    return digest.hexdigest()


# --- scanning units, and the index cache ------------------------------------------------------


def _scan_units(scanner: Callable, paths: list[str], options: list[dict], workers: int | None,
                cpu_share: int) -> list[tuple[pa.Table, dict]]:
    """(candidates, meta) of every unit, in order: from the index cache, else scanned."""
    results = [_IndexCacheEntry(scanner, path, opts).load() for path, opts in zip(paths, options)]
    todo = [i for i, result in enumerate(results) if result is None]
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        big = len(todo) >= PARALLEL_SCAN_MIN_UNITS or (
            len(todo) >= 2 and sum(os.path.getsize(paths[i]) for i in todo) >= PARALLEL_SCAN_MIN_BYTES)
        workers = min(max(1, cpus // cpu_share), 16, len(todo)) if big else 0
    jobs = ([scanner] * len(todo), [paths[i] for i in todo], [options[i] for i in todo])
    if workers <= 1:
        scanned = map(_scan_job, *jobs)
    else:
        # spawn: the caller may hold CUDA or threads, which a fork would copy unsafely.
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        scanned = pool.map(_scan_job, *jobs)
    try:
        for i, result in zip(todo, scanned):
            results[i] = result
    finally:
        if workers > 1:
            pool.shutdown(cancel_futures=True)
    return results


def _scan_job(scanner: Callable, path: str, options: dict) -> tuple[pa.Table, dict]:
    """Scan one unit, fingerprint it and keep both in the index cache (runs in scan processes)."""
    entry = _IndexCacheEntry(scanner, path, options)  # the file's state before it is read
    table, meta = scanner(path, options)
    meta["fingerprint"] = _unit_fingerprint(table)
    entry.store(table, meta)
    return table, meta


class _IndexCacheEntry:
    """Where the scan of one unit is kept, and whether the kept scan is still that unit's."""

    def __init__(self, scanner: Callable, path: str, options: dict):
        absolute = os.path.abspath(path)
        stat = os.stat(absolute)
        reader = json.dumps([SCAN_VERSION, scanner.__name__, absolute, options], sort_keys=True)
        self.identity = json.dumps([reader, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
        self.prefix = f"{os.path.basename(absolute)}.{_digest(reader, 8)}."
        name = f"{self.prefix}{_digest(self.identity, 16)}.arrow"
        self.files = [folder / name for folder in _index_cache_folders(absolute)]

    def load(self) -> tuple[pa.Table, dict] | None:
        for file in self.files:
            try:
                with pa.OSFile(str(file)) as source:  # into Arrow's pool, which the builder releases
                    table = pa.ipc.open_file(source).read_all()
            except (OSError, pa.ArrowException):
                continue  # absent, or unreadable: scan again
            metadata = table.schema.metadata or {}
            if metadata.get(b"rdkd.identity") == self.identity.encode():
                return table.replace_schema_metadata(None), json.loads(metadata[b"rdkd.meta"])
        return None

    def store(self, table: pa.Table, meta: dict) -> None:
        """Write the entry in the first folder that takes it and drop the unit's stale entries there."""
        tagged = table.replace_schema_metadata({"rdkd.identity": self.identity, "rdkd.meta": json.dumps(meta)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, tagged.schema) as writer:
            writer.write_table(tagged)
        for file in self.files:
            try:
                atomic_write_bytes(file, sink.getvalue())
            except OSError:
                continue  # not writable here (a read-only dataset): the next folder
            for stale in file.parent.iterdir():
                if stale.name.startswith(self.prefix) and stale.name != file.name and stale.suffix == ".arrow":
                    stale.unlink(missing_ok=True)
            return


def _index_cache_folders(unit: str) -> list[Path]:
    setting = os.environ.get(INDEX_CACHE_ENV, "")
    if setting == "off":
        return []
    if setting:
        return [Path(setting)]
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rdkd" / "index"
    return [Path(unit).parent / INDEX_CACHE_FOLDER, user_cache]


def _digest(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:length]


# --- the scanners: one unit of each format -> candidates ---------------------------------------


def _scan_csv(path: str, options: dict) -> tuple[pa.Table, dict]:
    """Candidates of a CSV file: one per image path (its rows' captions grouped), one per bad row."""
    # Captions longer than the csv module's default 128 KiB field limit are still captions.
    csv.field_size_limit(2**31 - 1)
    # surrogateescape keeps undecodable bytes so that they can be reported per caption
    # instead of failing the whole file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=options["separator"])
        try:
            return _csv_candidates(path, options, reader).table(), {}
        except csv.Error as err:
            raise UserError(f"dataset {path} line {reader.line_num}: {err}") from None


def _csv_candidates(path: str, options: dict, reader) -> _Candidates:
    separator = reader.dialect.delimiter
    header = next(reader, None)
    if header is None:
        raise UserError(f"dataset {path} is empty (no header row)")
    columns = {name.strip(): i for i, name in enumerate(header)}
    key_column = options["key_column"]
    wanted = [options["image_column"], options["caption_column"]] + ([key_column] if key_column else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        sep = {"\t": "tab", ",": "comma"}.get(separator, repr(separator))
        raise UserError(f"dataset {path} has no column {missing[0]!r} (separator {sep}; "
                        f"header: {separator.join(header)[:120]!r})")
    image_col, caption_col = columns[options["image_column"]], columns[options["caption_column"]]
    key_col = columns[key_column] if key_column else None

    candidates = _Candidates(path=pa.large_string())
    candidate_of_path: dict[str, int] = {}
    for row in reader:
        if not row:
            continue
        if len(row) <= max(image_col, caption_col, key_col or 0):
            candidates.add(f"line {reader.line_num}",
                           problem=f"{MALFORMED_ROW}: {len(row)} columns, the header has {len(header)}")
            continue
        if not row[image_col].strip():
            candidates.add(f"line {reader.line_num}", problem=EMPTY_PATH)
            continue
        rel = os.path.normpath(row[image_col].strip())
        candidate = candidate_of_path.get(rel)
        if candidate is None:
            key = row[key_col].strip() if key_col is not None else _path_key(rel)
            candidate = candidate_of_path[rel] = candidates.add(key, path=rel)
        caption, problem = _clean_caption(row[caption_col])
        if problem:
            candidates.columns["dropped"][candidate].append(problem)
        else:
            candidates.columns["captions"][candidate].append(caption)
    return candidates


def _scan_parquet(path: str, options: dict) -> tuple[pa.Table, dict]:
    """Candidates of a Parquet file: one per row."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except Exception as err:  # pyarrow raises ArrowInvalid/OSError for non-Parquet
        raise UserError(f"cannot read Parquet file {path}: {str(err).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    image_col = _pick_column(names, options["image_column"], "filepath", PARQUET_IMAGE_COLUMNS, path, "image")
    caption_col = _pick_column(names, options["caption_column"], "title", PARQUET_CAPTION_COLUMNS, path, "caption")
    if options["key_column"] and options["key_column"] not in names:
        raise UserError(f"Parquet file {path} has no column {options['key_column']!r}")
    key_col = options["key_column"] or ("key" if "key" in names else None)
    table = pf.read(columns=[caption_col] + ([key_col] if key_col else []))
    caption_values = table.column(caption_col).to_pylist()
    key_values = table.column(key_col).to_pylist() if key_col else None
    candidates = _Candidates(row=pa.int64(), row_group=pa.int32(), within=pa.int32())
    row = 0
    for group in range(pf.num_row_groups):
        for within in range(pf.metadata.row_group(group).num_rows):
            raw = caption_values[row]
            kept, dropped = [], []
            for value in raw if isinstance(raw, list) else [raw]:
                caption, problem = _clean_caption(value if value is not None else "")
                if problem:
                    dropped.append(problem)
                else:
                    kept.append(caption)
            key = str(key_values[row]) if key_values is not None else f"{options['stem']}:{row}"
            candidates.add(key, captions=kept, dropped=dropped, row=row, row_group=group, within=within)
            row += 1
    return candidates.table(), {"image_column": image_col}


def _scan_tar(path: str, options: dict) -> tuple[pa.Table, dict]:
    """Candidates of a tar shard: one per sample (:func:`iter_samples`), in member order.

    Reads headers and caption members only; image members are located, not read.
    A tar whose headers break part-way yields the samples before the break, then one
    ``broken tar member`` problem for the sample being read.
    """
    candidates = _Candidates(offset=pa.int64(), size=pa.int64())
    for sample in iter_samples(path):
        if sample.problem:
            candidates.add(sample.key, problem=sample.problem)
        else:
            kept, dropped = caption_lines(sample.caption)
            candidates.add(sample.key, captions=kept, dropped=dropped, offset=sample.image[0], size=sample.image[1])
    return candidates.table(), {}


def member_key(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member as webdataset groups them: the
    member's path up to the first dot of its file name, and what follows; None for members
    that belong to no sample (folders, links, names without an extension)."""
    if not member.isfile():
        return None
    directory, base = os.path.split(member.name)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


@dataclass
class TarSample:
    """One sample of a webdataset tar: consecutive members sharing a key (:func:`member_key`).

    ``image``: (offset, size) in the tar of its first image member; ``image_bytes`` and
    ``caption`` (the ``.txt`` member's bytes) when its contents were read; ``problem``: why
    the sample is unusable (no image, no caption, a broken member), None when it is fine;
    ``tag``: what the reader's ``contents`` callback said of it.
    """

    key: str
    tag: Any = True
    image: tuple[int, int] | None = None
    image_bytes: bytes | None = None
    caption: bytes | None = None
    problem: str | None = None


def iter_samples(path: str, contents: Callable[[str], Any] | None = None,
                 sequential: bool = False) -> Iterator[TarSample]:
    """The samples of the webdataset tar at ``path``, in member order: the one tar reader
    of the index scan, the stream's key scan and the stream's reader.

    ``contents(key)`` is asked once per sample, at its first member, in order; what it
    returns becomes the sample's ``tag``, and the sample's caption (and with ``sequential``
    its image bytes) is read only when the tag is truthy. Without it every caption is read.
    ``sequential``: one pass in large reads without seeking (a stream), image bytes read;
    otherwise images are located, not read. A sample missing its image or caption (when
    read) or with a member past the end of the file gets a ``problem``; a tar whose headers
    break part-way yields the samples before the break, then one ``broken tar member``
    problem for the sample being read, and ends. ``OSError`` from reading passes through.
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as file:
        try:
            tar = tarfile.open(fileobj=file, mode="r|" if sequential else "r:", bufsize=TAR_READ_BUFFER_BYTES)
        except tarfile.TarError as err:
            yield TarSample(Path(path).name, problem=f"{BROKEN_TAR_MEMBER}: {err}")
            return
        sample: TarSample | None = None
        members = iter(tar)
        while True:
            try:
                member = next(members)
                named = member_key(member)
                if named is None:
                    continue
                key, ext = named
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield _finished(sample)
                    sample = TarSample(key, tag=contents(key) if contents is not None else True)
                _read_member(tar, member, ext, sample, file_size, sequential)
            except StopIteration:
                break
            except tarfile.TarError as err:
                yield TarSample(sample.key if sample else Path(path).name, problem=f"{BROKEN_TAR_MEMBER}: {err}")
                return
        if sample is not None:
            yield _finished(sample)
        if not sequential:
            # tarfile ends iteration quietly at a corrupt header after the first member; the
            # end of a tar is zero blocks, so anything else there means samples were lost.
            file.seek(tar.offset)
            if file.read(512).strip(b"\0"):
                yield TarSample(f"{Path(path).name}@{tar.offset}", problem=(
                    f"{BROKEN_TAR_MEMBER}: unreadable tar header at byte {tar.offset}; rest of the shard skipped"))


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, sample: TarSample, file_size: int,
                 sequential: bool) -> None:
    """Take what ``sample`` needs of one of its members."""
    base = os.path.basename(member.name)
    if member.offset_data + member.size > file_size:
        sample.problem = f"{BROKEN_TAR_MEMBER}: {base} extends past the end of the file"
        return
    if ext in IMAGE_EXTENSIONS and sample.image is None:
        sample.image = (member.offset_data, member.size)
        if sequential and sample.tag:
            sample.image_bytes = tar.extractfile(member).read()
    elif ext == "txt" and sample.tag:
        sample.caption = tar.extractfile(member).read()
        if len(sample.caption) != member.size:
            sample.problem = f"{BROKEN_TAR_MEMBER}: {base} truncated"


def _finished(sample: TarSample) -> TarSample:
    if sample.problem is None and sample.tag:
        if sample.image is None:
            sample.problem = NO_IMAGE
        elif sample.caption is None:
            sample.problem = NO_CAPTION
    return sample


# --- helpers -------------------------------------------------------------------------------


def _path_key(path: str) -> str:
    return hashlib.sha256(path.replace(os.sep, "/").encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _clean_caption(raw: str | bytes) -> tuple[str, str | None]:
    """(caption stripped, None) or ("", reason) for an empty or non-UTF-8 caption."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return "", CAPTION_NOT_UTF8
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from surrogateescape: bytes that were not UTF-8
        return "", CAPTION_NOT_UTF8
    caption = raw.strip()
    return (caption, None) if caption else ("", EMPTY_CAPTION)


def caption_lines(data: bytes) -> tuple[tuple[str, ...], list[str]]:
    """(captions, reasons dropped) of a webdataset ``.txt`` member: one caption per
    non-empty line; no captions and the reason when it has none or is not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return (), [CAPTION_NOT_UTF8]
    kept = tuple(line.strip() for line in text.splitlines() if line.strip())
    return kept, ([] if kept else [EMPTY_CAPTION])


def _pick_column(names: list[str], given: str, default: str, candidates: Iterable[str],
                 file: str, what: str) -> str:
    if given != default:
        if given not in names:
            raise UserError(f"Parquet file {file} has no column {given!r} (columns: {', '.join(names)})")
        return given
    for name in candidates:
        if name in names:
            return name
    raise UserError(
        f"Parquet file {file} has no {what} column (looked for {', '.join(candidates)}; "
        f"columns: {', '.join(names)}); pass --{what}-column"
    )


def expand_shards(path: str) -> list[str]:
    """The tar shards of a webdataset spec: a folder's ``*.tar`` (sorted) or a brace pattern;
    :class:`UserError` when there are none or one is missing."""
    folder = Path(path)
    if folder.is_dir():
        shards = sorted(str(p) for p in folder.glob("*.tar"))
        if not shards:
            raise UserError(f"dataset folder {path} holds no .tar shards")
        return shards
    shards = list(braceexpand.braceexpand(str(path)))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"dataset shard not found: {missing[0]}{more}")
    return shards
