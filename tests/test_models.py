"""rdkd.models: loading open_clip teachers, students and exports."""

from __future__ import annotations

import torch

from rdkd.models import load_clip


def test_tiny_teacher_loads(tiny_teacher):
    loaded = load_clip(tiny_teacher)
    assert loaded.embed_dim == 32
    assert loaded.context_length == 16
    assert abs(loaded.logit_scale - 50.0) < 1e-3
    with torch.no_grad():
        text = loaded.model.encode_text(loaded.tokenizer(["a photo"]))
    assert text.shape == (1, 32)
