"""Dataset readers shared by every stage: open_clip CSV/TSV, webdataset tar shards, Parquet.

A dataset is opened into a lightweight *index*: keys, captions and where each image's bytes
live (a file path, a tar member offset, a Parquet row). No image bytes are read while
indexing, so opening a CC3M-size dataset costs one pass over its captions; images are read
and decoded later, one at a time, in DataLoader workers.

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

The fingerprint is the sha256 of the format, keys and captions in order. Image bytes are
not hashed: at LAION scale that is a full read of tens of terabytes; keys (which
img2dataset derives from shard and position) and captions identify the data well enough
to refuse a cache built from a different dataset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import multiprocessing
import os
import tarfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import braceexpand
import numpy as np
from PIL import Image, UnidentifiedImageError

from rdkd.errors import SampleError, UserError

FORMATS = ("auto", "csv", "webdataset", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# 2**27 pixels (e.g. 11585 x 11585) is far above any training image and far below what
# exhausts memory when decoded (3 bytes per pixel: ~400 MB).
DEFAULT_MAX_PIXELS = 2**27
# Below this much shard data, starting scan processes costs more than it saves.
PARALLEL_SCAN_MIN_BYTES = 256 * 2**20
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

    path: str
    format: str = "auto"
    image_column: str = "filepath"
    caption_column: str = "title"
    key_column: str | None = None
    separator: str = "\t"

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
    if not data:
        raise SampleError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise SampleError(f"image too large: {width}x{height} pixels (limit {max_pixels})")
            image.load()
    except SampleError:
        raise
    except Image.DecompressionBombError as err:
        raise SampleError(f"image too large: {err}") from None
    except UnidentifiedImageError:
        raise SampleError("not an image") from None
    except Exception as err:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...) on bad bytes
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


class Dataset:
    """An opened dataset: an index of entries (one per image) and lazy access to images.

    Picklable and cheap to pickle: open file handles are per process, created on first read
    and dropped when pickled (DataLoader workers each open their own).
    """

    format: str
    _per_process_state: tuple[str, ...] = ()  # attributes not pickled: file handles, read caches

    def __init__(self, spec: DataSpec, keys: list[str], captions: list[tuple[str, ...]],
                 sources: list[str], rejects: list[Reject], caption_drops: list[Reject]):
        self.spec = spec
        self.keys = keys
        self._captions = captions
        self._sources = sources
        self.index_rejects = rejects
        self.caption_drops = caption_drops
        self.fingerprint = _fingerprint(self.format, keys, captions)

    def __len__(self) -> int:
        return len(self.keys)

    def captions(self, i: int) -> tuple[str, ...]:
        """All captions of entry ``i``, in dataset order."""
        return self._captions[i]

    def source(self, i: int) -> str:
        """The file (CSV), shard (webdataset) or file and row (Parquet) entry ``i`` came from."""
        return self._sources[i]

    @property
    def shard_ranges(self) -> list[range] | None:
        """One range of entry indices per data shard (webdataset only), in order."""
        return None

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self._captions)

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

    def __init__(self, spec: DataSpec):
        path = Path(spec.path)
        if not path.is_file():
            raise UserError(f"dataset not found: {spec.path}")
        separator = SEPARATOR_NAMES.get(spec.separator, spec.separator)
        if len(separator) != 1:
            raise UserError(f"CSV separator must be one character (or tab, comma), not {spec.separator!r}")
        # Captions longer than the csv module's default 128 KiB field limit are still captions.
        csv.field_size_limit(2**31 - 1)
        # surrogateescape keeps undecodable bytes so that they can be reported per caption
        # instead of failing the whole file.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=separator)
            try:
                keys, caption_lists, paths, rejects, drops = _index_csv_rows(spec, path, reader)
            except csv.Error as err:
                raise UserError(f"dataset {spec.path} line {reader.line_num}: {err}") from None

        root = path.parent
        keep = _drop_captionless(caption_lists, drops, rejects)
        self._root = str(root)
        self._paths = [paths[i] for i in keep]
        super().__init__(
            spec,
            [keys[i] for i in keep],
            [tuple(caption_lists[i]) for i in keep],
            [str(root / p) for p in self._paths],
            rejects,
            [r for e, r in drops if caption_lists[e]],
        )

    def read_image_bytes(self, i: int) -> bytes:
        path = os.path.join(self._root, self._paths[i])
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

    def __init__(self, spec: DataSpec, workers: int | None = None):
        self._shards = _expand_shards(spec.path)
        keys: list[str] = []
        captions: list[tuple[str, ...]] = []
        sources: list[str] = []
        rejects: list[Reject] = []
        drops: list[Reject] = []
        seen: set[str] = set()
        shard_of, offsets, sizes = [], [], []
        ranges: list[range] = []
        scans = _scan_shards(self._shards, workers)
        for shard_index, (shard, scanned) in enumerate(zip(self._shards, scans)):
            start = len(keys)
            for key, image, caption_member, problem in scanned:
                if problem:
                    rejects.append(Reject(key, shard, problem))
                    continue
                if key in seen:
                    rejects.append(Reject(key, shard, DUPLICATE_KEY))
                    continue
                kept, dropped = _split_caption_lines(caption_member)
                if not kept:
                    rejects.append(Reject(key, shard, dropped[0] if dropped else EMPTY_CAPTION))
                    continue
                drops.extend(Reject(key, shard, reason) for reason in dropped)
                seen.add(key)
                keys.append(key)
                captions.append(kept)
                sources.append(shard)
                shard_of.append(shard_index)
                offsets.append(image[0])
                sizes.append(image[1])
            ranges.append(range(start, len(keys)))
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._ranges = ranges
        self._open_shard: tuple[int, int] | None = None  # (shard, file descriptor), per process
        super().__init__(spec, keys, captions, sources, rejects, drops)

    @property
    def shards(self) -> list[str]:
        return list(self._shards)

    @property
    def shard_ranges(self) -> list[range]:
        return list(self._ranges)

    def read_image_bytes(self, i: int) -> bytes:
        shard = int(self._shard_of[i])
        opened = self._open_shard
        if opened is None or opened[0] != shard:
            try:
                opened = (shard, os.open(self._shards[shard], os.O_RDONLY))
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

    def __init__(self, spec: DataSpec):
        import pyarrow.parquet as pq

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
        self._files = files

        keys: list[str] = []
        captions: list[tuple[str, ...]] = []
        sources: list[str] = []
        rejects: list[Reject] = []
        drops: list[Reject] = []
        seen: set[str] = set()
        locations: list[tuple[int, int, int]] = []  # file, row group, row within the group
        self._image_column = None
        for file_index, file in enumerate(files):
            try:
                pf = pq.ParquetFile(file, memory_map=True)
            except Exception as err:  # pyarrow raises ArrowInvalid/OSError for non-Parquet
                raise UserError(f"cannot read Parquet file {file}: {str(err).splitlines()[0]}") from None
            names = pf.schema_arrow.names
            image_col = _pick_column(names, spec.image_column, "filepath", PARQUET_IMAGE_COLUMNS, file, "image")
            caption_col = _pick_column(names, spec.caption_column, "title", PARQUET_CAPTION_COLUMNS, file, "caption")
            if spec.key_column and spec.key_column not in names:
                raise UserError(f"Parquet file {file} has no column {spec.key_column!r}")
            key_col = spec.key_column or ("key" if "key" in names else None)
            if self._image_column not in (None, image_col):
                raise UserError(f"Parquet files of {spec.path} disagree on the image column")
            self._image_column = image_col
            stem = str(Path(file).relative_to(path).with_suffix("")) if path.is_dir() else Path(file).stem
            row = 0
            for group in range(pf.num_row_groups):
                columns = [caption_col] + ([key_col] if key_col else [])
                table = pf.read_row_group(group, columns=columns)
                caption_values = table.column(caption_col).to_pylist()
                key_values = table.column(key_col).to_pylist() if key_col else None
                for within, raw in enumerate(caption_values):
                    key = str(key_values[within]) if key_values else f"{stem}:{row}"
                    source = f"{file}#{row}"
                    row += 1
                    if key in seen:
                        rejects.append(Reject(key, source, DUPLICATE_KEY))
                        continue
                    raws = raw if isinstance(raw, list) else [raw]
                    kept, dropped = [], []
                    for value in raws:
                        caption, problem = _clean_caption(value if value is not None else "")
                        if problem:
                            dropped.append(problem)
                        else:
                            kept.append(caption)
                    if not kept:
                        rejects.append(Reject(key, source, dropped[0] if dropped else EMPTY_CAPTION))
                        continue
                    drops.extend(Reject(key, source, reason) for reason in dropped)
                    seen.add(key)
                    keys.append(key)
                    captions.append(tuple(kept))
                    sources.append(source)
                    locations.append((file_index, group, within))
        self._locations = np.asarray(locations, dtype=np.int64).reshape(-1, 3)
        self._files_open: dict | None = None
        self._row_group_cache: tuple | None = None
        super().__init__(spec, keys, captions, sources, rejects, drops)

    def read_image_bytes(self, i: int) -> bytes:
        import pyarrow.parquet as pq

        file_index, group, within = (int(v) for v in self._locations[i])
        cached = self._row_group_cache
        if cached is None or cached[0] != (file_index, group):
            if self._files_open is None:
                self._files_open = {}
            pf = self._files_open.get(file_index)
            if pf is None:
                pf = self._files_open[file_index] = pq.ParquetFile(self._files[file_index], memory_map=True)
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


def _index_csv_rows(spec: DataSpec, path: Path, reader):
    """Group CSV rows by image path: (keys, caption lists, paths, rejects, caption drops)."""
    root = path.parent
    separator = reader.dialect.delimiter
    header = next(reader, None)
    if header is None:
        raise UserError(f"dataset {spec.path} is empty (no header row)")
    columns = {name.strip(): i for i, name in enumerate(header)}
    wanted = [spec.image_column, spec.caption_column] + ([spec.key_column] if spec.key_column else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        sep = {"\t": "tab", ",": "comma"}.get(separator, repr(separator))
        raise UserError(f"dataset {spec.path} has no column {missing[0]!r} (separator {sep}; "
                        f"header: {separator.join(header)[:120]!r})")
    image_col, caption_col = columns[spec.image_column], columns[spec.caption_column]
    key_col = columns[spec.key_column] if spec.key_column else None

    entry_of_path: dict[str, int] = {}
    known_keys: set[str] = set()
    keys: list[str] = []
    caption_lists: list[list[str]] = []
    paths: list[str] = []
    rejects: list[Reject] = []
    drops: list[tuple[int, Reject]] = []
    rejected_paths: set[str] = set()
    for row in reader:
        if not row:
            continue
        if len(row) <= max(image_col, caption_col, key_col or 0):
            rejects.append(Reject(f"line {reader.line_num}", str(path),
                                  f"{MALFORMED_ROW}: {len(row)} columns, the header has {len(header)}"))
            continue
        if not row[image_col].strip():
            rejects.append(Reject(f"line {reader.line_num}", str(path), EMPTY_PATH))
            continue
        rel = os.path.normpath(row[image_col].strip())
        entry = entry_of_path.get(rel)
        if entry is None:
            if rel in rejected_paths:
                continue
            key = row[key_col].strip() if key_col is not None else _path_key(rel)
            if key in known_keys:
                rejects.append(Reject(key, str(root / rel), DUPLICATE_KEY))
                rejected_paths.add(rel)
                continue
            entry = len(keys)
            entry_of_path[rel] = entry
            known_keys.add(key)
            keys.append(key)
            caption_lists.append([])
            paths.append(rel)
        caption, problem = _clean_caption(row[caption_col])
        if problem:
            drops.append((entry, Reject(keys[entry], str(root / rel), problem)))
        else:
            caption_lists[entry].append(caption)
    return keys, caption_lists, paths, rejects, drops


def open_dataset(spec: DataSpec, workers: int | None = None) -> Dataset:
    """Index a dataset (captions and image locations; no image bytes are read).

    ``workers``: processes that scan webdataset shards in parallel (tarfile parses every
    member header in Python, the cost of indexing CC3M-size shard sets). None: one per CPU
    (shared among torchrun's local ranks), up to 16, for 8+ shards holding 256 MiB or
    more; 0 or 1: in this process.
    """
    fmt = spec.resolved_format()
    if fmt == "csv":
        return CsvDataset(spec)
    if fmt == "webdataset":
        return WebDataset(spec, workers=workers)
    return ParquetDataset(spec)


# --- helpers -------------------------------------------------------------------------------


def _fingerprint(fmt: str, keys: Sequence[str], captions: Sequence[tuple[str, ...]]) -> str:
    digest = hashlib.sha256(f"rdkd-dataset-v1\0{fmt}\0".encode())
    for key, caps in zip(keys, captions):
        digest.update(key.encode("utf-8", "surrogateescape") + b"\0")
        digest.update(len(caps).to_bytes(4, "little"))
        for caption in caps:
            digest.update(caption.encode("utf-8") + b"\0")
    return digest.hexdigest()


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


def _split_caption_lines(data: bytes) -> tuple[tuple[str, ...], list[str]]:
    """Captions of a webdataset ``.txt`` member: one per non-empty line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return (), [CAPTION_NOT_UTF8]
    kept = tuple(line.strip() for line in text.splitlines() if line.strip())
    return kept, ([] if kept else [EMPTY_CAPTION])


def _drop_captionless(caption_lists: list[list[str]], drops: list[tuple[int, Reject]],
                      rejects: list[Reject]) -> list[int]:
    """Entries that kept a caption; the others become rejects with their first problem."""
    first_problem: dict[int, Reject] = {}
    for entry, reject in drops:
        first_problem.setdefault(entry, reject)
    keep = []
    for entry, caps in enumerate(caption_lists):
        if caps:
            keep.append(entry)
        else:
            rejects.append(first_problem[entry])
    return keep


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


def _expand_shards(path: str) -> list[str]:
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


def _scan_shards(shards: list[str], workers: int | None) -> Iterator[list]:
    """The samples of each shard (see :func:`_scan_tar`), in shard order."""
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        cpus //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: ranks share the CPUs
        big = len(shards) >= 8 and sum(os.path.getsize(s) for s in shards) >= PARALLEL_SCAN_MIN_BYTES
        workers = min(cpus, 16, len(shards)) if big else 0
    if workers <= 1:
        yield from (list(_scan_tar(shard)) for shard in shards)
        return
    # spawn: the caller may hold CUDA or threads, which a fork would copy unsafely.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_scan_tar_list, shards)


def _scan_tar_list(shard: str) -> list:
    return list(_scan_tar(shard))


def _scan_tar(shard: str):
    """Yield (key, (image offset, image size), caption bytes, problem) per sample of a tar.

    Reads headers and caption members only; image members are located, not read.
    A tar whose headers break part-way yields the samples before the break, then one
    ``broken tar member`` problem for the sample being read.
    """
    file_size = os.path.getsize(shard)
    try:
        tar = tarfile.open(shard, mode="r:")
    except tarfile.TarError as err:
        yield (Path(shard).name, None, None, f"{BROKEN_TAR_MEMBER}: {err}")
        return
    with tar:
        current_key: str | None = None
        image: tuple[int, int] | None = None
        caption: bytes | None = None
        problem: str | None = None

        def finish():
            if current_key is None:
                return None
            if problem:
                return (current_key, None, None, problem)
            if image is None:
                return (current_key, None, None, NO_IMAGE)
            if caption is None:
                return (current_key, None, None, NO_CAPTION)
            return (current_key, image, caption, None)

        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except tarfile.TarError as err:
                yield (current_key or Path(shard).name, None, None, f"{BROKEN_TAR_MEMBER}: {err}")
                return
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            if "." not in base:
                continue
            stem, ext = base.split(".", 1)
            key = f"{directory}/{stem}" if directory else stem
            if key != current_key:
                done = finish()
                if done:
                    yield done
                current_key, image, caption, problem = key, None, None, None
            if member.offset_data + member.size > file_size:
                problem = f"{BROKEN_TAR_MEMBER}: {base} extends past the end of the file"
                continue
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS and image is None:
                image = (member.offset_data, member.size)
            elif ext == "txt":
                extracted = tar.extractfile(member)
                caption = extracted.read() if extracted is not None else b""
                if len(caption) != member.size:
                    problem = f"{BROKEN_TAR_MEMBER}: {base} truncated"
        done = finish()
        if done:
            yield done
        # tarfile ends iteration quietly at a corrupt header after the first member; the
        # end of a tar is zero blocks, so anything else there means samples were lost.
        tar.fileobj.seek(tar.offset)
        if tar.fileobj.read(512).strip(b"\0"):
            yield (f"{Path(shard).name}@{tar.offset}", None, None,
                   f"{BROKEN_TAR_MEMBER}: unreadable tar header at byte {tar.offset}; rest of the shard skipped")
