"""The teacher-embedding cache: format, writer, reader (specified in ``cache/FORMAT.md``)."""

from rdkd.cache.format import FORMAT_VERSION, STORAGE_DTYPES
from rdkd.cache.reader import CacheEntry, CacheLookup, CacheShard, TeacherCache
from rdkd.cache.views import ViewConfig, eval_view_box, random_view, render_view, view_rng

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "CacheEntry",
    "CacheLookup",
    "CacheShard",
    "TeacherCache",
    "ViewConfig",
    "eval_view_box",
    "random_view",
    "render_view",
    "view_rng",
]
