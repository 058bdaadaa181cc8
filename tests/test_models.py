"""rdkd.models: loading open_clip teachers, creating students, exporting for plain open_clip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from builders import TINY_CLIP_CONFIG, make_image
from rdkd.errors import UserError
from rdkd.models import (ModelSpec, create_student, export_clip, file_sha256, load_clip, parse_model_spec,
                         state_dict_sha256)

CAPTIONS = ["a red square on grass", "two dogs"]


def embed(loaded, image):
    with torch.no_grad():
        img = loaded.model.encode_image(loaded.preprocess(image).unsqueeze(0))
        txt = loaded.model.encode_text(loaded.tokenizer(CAPTIONS))
    return img, txt


def test_tiny_teacher_loads_with_its_own_preprocessing(tiny_teacher):
    loaded = load_clip(tiny_teacher)
    assert not loaded.model.training
    assert loaded.embed_dim == 32 and loaded.context_length == 16
    assert loaded.logit_scale == pytest.approx(50.0, rel=1e-5)
    assert loaded.preprocess_cfg["size"] == [32, 32]
    assert loaded.preprocess_cfg["interpolation"] == "bicubic"
    assert loaded.tokenizer(CAPTIONS).shape == (2, 16)
    assert loaded.weights_sha256 == file_sha256(tiny_teacher.pretrained)
    info = loaded.info
    assert info["spec"] == {"name": None, "pretrained": tiny_teacher.pretrained, "config": tiny_teacher.config}
    assert info["preprocess"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    assert info["tokenizer"] == "SimpleTokenizer" and info["context_length"] == 16
    json.dumps(info)  # manifests store it as JSON


def test_load_is_deterministic_and_equals_plain_open_clip(tiny_teacher, tmp_path):
    image = make_image(7, (50, 37))
    first, second = embed(load_clip(tiny_teacher), image), embed(load_clip(tiny_teacher), image)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # The same model through open_clip's documented route for a custom config.
    config = tmp_path / "tiny-direct.json"
    config.write_text(Path(tiny_teacher.config).read_text())
    open_clip.add_model_config(config)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-direct", pretrained=tiny_teacher.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-direct")
    with torch.no_grad():
        assert torch.equal(model.encode_image(preprocess(image).unsqueeze(0)), first[0])
        assert torch.equal(model.encode_text(tokenizer(CAPTIONS)), first[1])


def test_open_clip_training_checkpoint_loads(tiny_teacher, tmp_path):
    # What open_clip's trainer saves (epoch_N.pt): a dict with a DDP-prefixed state_dict.
    state = torch.load(tiny_teacher.pretrained)
    checkpoint = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)
    image = make_image(4)
    direct = embed(load_clip(tiny_teacher), image)
    loaded = embed(load_clip(ModelSpec(config=tiny_teacher.config, pretrained=str(checkpoint))), image)
    assert torch.equal(direct[0], loaded[0]) and torch.equal(direct[1], loaded[1])


def test_parse_model_spec(tmp_path, tiny_clip_config):
    assert parse_model_spec("ViT-L-14", "openai") == ModelSpec(name="ViT-L-14", pretrained="openai")
    assert parse_model_spec(str(tiny_clip_config), "w.pt") == ModelSpec(config=str(tiny_clip_config), pretrained="w.pt")
    assert parse_model_spec("hf-hub:laion/x") == ModelSpec(name="hf-hub:laion/x")
    assert parse_model_spec(str(tmp_path)) == ModelSpec(name=f"local-dir:{tmp_path}")
    with pytest.raises(UserError, match="model config not found"):
        parse_model_spec(str(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="is a checkpoint file, not a model"):
        parse_model_spec(str(tmp_path / "w.pt"))
    with pytest.raises(UserError, match="brings its own weights"):
        parse_model_spec("hf-hub:laion/x", "openai")
    assert ModelSpec(name="ViT-L-14", pretrained="openai").describe() == "ViT-L-14/openai"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spec", [ModelSpec("ViT-B-32", "openai"), ModelSpec("hf-hub:timm/vit_base_patch32_clip_224.openai")],
                         ids=["tag", "hf-hub"])
def test_spec_that_needs_a_download_fails_offline_in_one_line(spec, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as err:
        load_clip(spec)
    message = str(err.value)
    assert "needs a download" in message and "offline" in message and "\n" not in message


def fake_hub_repo(cache: Path, repo: str, loaded) -> Path:
    """A Hub repo as huggingface_hub caches it (refs/main -> snapshot), holding an export."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    export_clip(loaded.model, loaded.model_config, snapshot)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_pretrained_tag_loads_from_cache_with_the_tags_activation(tiny_teacher, tmp_path, monkeypatch):
    # A tag resolved as open_clip resolves ViT-L-14 + openai: weights from the Hub cache,
    # trained with QuickGELU while the model config says GELU.
    import huggingface_hub.constants
    from open_clip import pretrained as oc_pretrained

    teacher = load_clip(tiny_teacher)
    snapshot = fake_hub_repo(tmp_path / "hub", "someone/tiny-tagged", teacher)
    config = tmp_path / "rdkd-tiny-tagged.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, "rdkd-tiny-tagged",
                        {"tinytag": oc_pretrained._pcfg(hf_hub="someone/tiny-tagged/", quick_gelu=True)})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tagged = load_clip(ModelSpec("rdkd-tiny-tagged", "tinytag"))
    assert isinstance(tagged.model.visual.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert tagged.model_config["quick_gelu"] is True
    assert tagged.weights_sha256 == file_sha256(snapshot / "open_clip_model.safetensors")
    assert state_dict_sha256(tagged.model) == state_dict_sha256(teacher.model)  # same weights
    image = make_image(9)
    assert not torch.allclose(embed(tagged, image)[0], embed(teacher, image)[0])  # other activation


@pytest.mark.timeout(60)
def test_unreachable_hub_fails_at_once_without_retries(monkeypatch, tmp_path):
    # Not marked offline, but the Hub cannot be reached (".invalid" never resolves): one
    # connection attempt answers, instead of huggingface_hub's ~25 s of retries per file.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://rdkd-test.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with pytest.raises(UserError, match="needs a download from the hub and this machine is offline "
                                        r"\(rdkd-test.invalid unreachable"):
        load_clip(ModelSpec("hf-hub:someone/some-clip"))


def test_hf_hub_spec_loads_from_the_local_cache_offline(tiny_teacher, tmp_path, monkeypatch):
    import huggingface_hub.constants

    teacher = load_clip(tiny_teacher)
    snapshot = fake_hub_repo(tmp_path, "someone/tiny-clip", teacher)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    # Not marked offline, and no Hub to reach: the cached copy is used without the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://rdkd-test.invalid")
    cached = load_clip(ModelSpec("hf-hub:someone/tiny-clip"))
    image = make_image(2)
    assert torch.equal(embed(cached, image)[0], embed(teacher, image)[0])
    assert cached.weights_sha256 == file_sha256(snapshot / "open_clip_model.safetensors")
    assert cached.model_config == teacher.model_config


def test_bad_specs_are_user_errors(tiny_teacher, tiny_clip_config, tmp_path):
    with pytest.raises(UserError, match=r"unknown open_clip model 'ViT-B-33' \(did you mean"):
        load_clip(ModelSpec("ViT-B-33"))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_clip(ModelSpec(config=str(tiny_clip_config), pretrained=str(tmp_path / "missing.pt")))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_clip(ModelSpec("ViT-T-16", str(tmp_path / "missing.pt")))
    with pytest.raises(UserError, match="has no pretrained tag 'nosuchtag'"):
        load_clip(ModelSpec("ViT-B-32", "nosuchtag"))
    with pytest.raises(UserError, match="does not fit model ViT-T-16"):
        load_clip(ModelSpec("ViT-T-16", tiny_teacher.pretrained))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UserError, match="cannot load checkpoint .*garbage.pt"):
        load_clip(ModelSpec(config=str(tiny_clip_config), pretrained=str(garbage)))
    not_a_config = tmp_path / "c.json"
    not_a_config.write_text('{"embed_dim": 3}')
    with pytest.raises(UserError, match="not an open_clip config"):
        load_clip(ModelSpec(config=str(not_a_config)))
    with pytest.raises(UserError, match="no open_clip_config.json"):
        load_clip(ModelSpec(name=f"local-dir:{tmp_path}"))


def test_config_named_like_a_builtin_does_not_shadow_it(tmp_path):
    config = tmp_path / "ViT-B-32.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    assert load_clip(ModelSpec(config=str(config))).embed_dim == 32
    assert open_clip.get_model_config("ViT-B-32")["embed_dim"] == 512


def test_vit_t_16_student_from_rdkd_configs():
    assert "ViT-T-16" in open_clip.list_models()
    student = create_student("ViT-T-16")
    assert student.model.training
    visual, text = student.model.visual, student.model.transformer
    assert student.embed_dim == 512 and student.context_length == 77
    assert visual.transformer.width == 192 and len(visual.transformer.resblocks) == 12
    assert visual.transformer.resblocks[0].attn.num_heads == 3
    assert text.width == 384 and text.resblocks[0].attn.num_heads == 6 and len(text.resblocks) == 12
    assert student.preprocess_cfg["size"] == [224, 224]


def test_student_random_init_is_seeded_and_init_loads_weights(tiny_teacher, tiny_clip_config):
    torch.manual_seed(3)
    a = create_student(str(tiny_clip_config))
    torch.manual_seed(3)
    b = create_student(str(tiny_clip_config))
    assert a.weights_sha256 == b.weights_sha256 == state_dict_sha256(a.model)
    init = create_student(str(tiny_clip_config), init=tiny_teacher.pretrained)
    assert state_dict_sha256(init.model) == state_dict_sha256(load_clip(tiny_teacher).model)


def test_export_round_trip_with_plain_open_clip(tiny_teacher, tmp_path):
    student = create_student(tiny_teacher.config, init=tiny_teacher.pretrained)
    with torch.no_grad():  # make it differ from the teacher file, as a trained student would
        student.model.visual.proj.mul_(2.0)
        student.model.logit_scale.fill_(float(np.log(30.0)))
    student.model.eval()
    paths = export_clip(student.model, student.model_config, tmp_path / "export")
    assert {p.name for p in (tmp_path / "export").iterdir()} == {
        "open_clip_config.json", "open_clip_model.safetensors", "model_config.json"}
    image = make_image(11, (40, 40))
    image_path = tmp_path / "img.png"
    image.save(image_path)
    expected_img, expected_txt = embed(student, image)

    # Plain open_clip in a fresh process, no rdkd import.
    code = textwrap.dedent(f"""
        import sys, torch, open_clip
        from PIL import Image
        assert "rdkd" not in sys.modules
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{paths['dir']}")
        tokenizer = open_clip.get_tokenizer("local-dir:{paths['dir']}")
        model.eval()
        with torch.no_grad():
            img = model.encode_image(preprocess(Image.open("{image_path}")).unsqueeze(0))
            txt = model.encode_text(tokenizer({CAPTIONS!r}))
        torch.save({{"img": img, "txt": txt, "scale": model.logit_scale.exp().item()}}, "{tmp_path / 'out.pt'}")
        assert "rdkd" not in sys.modules
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["img"], expected_img) and torch.equal(out["txt"], expected_txt)
    assert out["scale"] == pytest.approx(30.0, rel=1e-5)

    # The bare model config with open_clip's add_model_config + pretrained=<weights file>.
    open_clip.add_model_config(paths["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms("model_config", pretrained=str(paths["weights"]))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(preprocess(image).unsqueeze(0)), expected_img)
    # And back through rdkd as a teacher (a student's export can teach the next one).
    again = load_clip(parse_model_spec(str(paths["dir"])))
    assert torch.equal(embed(again, image)[0], expected_img)
    assert again.weights_sha256 == file_sha256(paths["weights"])
