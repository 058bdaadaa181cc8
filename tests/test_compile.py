"""--compile: a torch.compile'd student trains as the eager one does (same data, same steps)."""

from __future__ import annotations

import json

import pytest

TINY_STUDENT = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.mark.slow
def test_compiled_step_trains_as_eager(tmp_path, csv_dataset):
    """Four fp32 steps of the plain CLIP loss from the same seed, eager and compiled: the
    losses of every log record within 1e-4 and the exported weights within 1e-4 (max abs;
    fused kernels reorder float sums, nothing else may differ)."""
    from safetensors.torch import load_file

    from rdkd.stages.train_student import train_student

    student = tmp_path / "tiny.json"
    student.write_text(json.dumps(TINY_STUDENT))
    losses, weights = {}, {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        train_student(csv_dataset, str(student), "clip", None, steps=4, batch_size=4, workers=0, device="cpu",
                      compile=compiled, log_every=1, out=str(out), progress=False)
        losses[compiled] = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        weights[compiled] = load_file(out / "export" / "open_clip_model.safetensors")
    assert len(losses[False]) == len(losses[True]) == 4
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) <= 1e-4
    assert weights[False].keys() == weights[True].keys()
    assert max((weights[False][k].float() - weights[True][k].float()).abs().max().item()
               for k in weights[False]) <= 1e-4
