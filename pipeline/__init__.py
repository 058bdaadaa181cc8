"""rdkd: distil open_clip teachers into small students from an offline teacher-embedding cache."""

__version__ = "0.1.0"
