"""What ``rdkd cache info`` and ``rdkd cache verify`` print."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from rdkd import pixels
from rdkd.cache.reader import TeacherCache


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_info(path: Path, console: Console | None = None) -> None:
    """A table of the manifest: teacher, preprocessing, views, dataset, counts and sizes."""
    cache = TeacherCache.open(path)
    m = cache.manifest
    # .get: a manifest written by an older or foreign writer may lack descriptive fields
    teacher, pre, views, counts = m.get("teacher", {}), m.get("preprocess", {}), m.get("views", {}), m["counts"]
    spec = teacher.get("spec", {})
    model = spec.get("name") or spec.get("config")
    weights = spec.get("pretrained") or "(random init)"
    size_bytes = sum(s[kind]["bytes"] for s in m["shards"] for kind in ("images", "texts"))
    table = Table(title=f"teacher cache {path}", show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("cache id", m["cache_id"]),
        ("format", f"{m['format']} v{m['format_version']} (rdkd {m.get('rdkd_version', '?')})"),
        ("teacher", f"{model} / {weights}"),
        ("weights sha256", teacher.get("weights_sha256", "?")),
        ("logit scale", f"{cache.logit_scale:.4g}"),
        ("embeddings", f"dim {m['dim']}, stored as {m['storage_dtype']}, L2-normalised; "
                       f"computed in {m.get('precision', '?')}"),
        ("preprocess", f"{pixels.mode_of(m)}: {pre.get('size')} px, {pre.get('resize_mode')}, "
                       f"{pre.get('interpolation')}, mean {pre.get('mean')}, std {pre.get('std')}"),
        ("views", f"{cache.views} per image (view 0: eval view"
                  + (f"; others: crop scale {views.get('scale')}, flip p {views.get('flip_prob')}, "
                     f"seed {views.get('seed')})" if cache.views > 1 else ")")),
        ("tokenizer", f"{m.get('tokenizer', {}).get('name')}, "
                      f"context length {m.get('tokenizer', {}).get('context_length')}"),
        ("dataset", f"{m['dataset'].get('path')} ({m['dataset'].get('format')})"),
        ("dataset fingerprint", m["dataset"]["fingerprint"]),
        ("images", f"{counts['images']:,} ({counts['image_rows']:,} view rows)"),
        ("captions", f"{counts['captions']:,}"),
        ("rejects", f"{counts['rejects']:,}"),
        ("shards", f"{len(m['shards'])} ({m.get('layout', {}).get('shard_by', '?')}), {_mib(size_bytes)}"),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    (console or Console()).print(table)


def verify(path: Path, console: Console | None = None) -> None:
    """Check checksums, counts and dims; ``UserError`` (one line, exit 2) on the first problem."""
    cache = TeacherCache.open(path)
    cache.require_intact()
    files = 2 + 2 * cache.num_shards
    (console or Console()).print(
        f"ok: {path}: {files} files match their sha256; {cache.num_images:,} images, {cache.num_texts:,} captions, dim {cache.dim}"
    )
