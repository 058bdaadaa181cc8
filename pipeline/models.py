"""open_clip model specs: resolve, load (teachers), create (students) and export CLIP models.

Everything is built by open_clip's own factory (``create_model_and_transforms``,
``get_tokenizer``); rdkd only resolves what the user typed into the arguments open_clip
wants and turns its failures into one-line :class:`UserError` messages.

A spec is one of:

- an open_clip model name and pretrained tag, as open_clip resolves them
  (``ViT-L-14`` + ``openai``); the weights come from the Hugging Face cache or a download;
- ``hf-hub:org/name`` (config and weights from a Hub repo) or ``local-dir:/path`` (a folder
  with ``open_clip_config.json`` and weights, as :func:`export_clip` writes);
- a model name with a local checkpoint file as ``pretrained``;
- a model-config JSON (open_clip's format: ``embed_dim``, ``vision_cfg``, ``text_cfg``; or
  an ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``) with an optional
  checkpoint file. No checkpoint means random init (seed it with ``torch.manual_seed``).

Model names that open_clip does not ship are looked up in rdkd's own ``model_configs/``
(e.g. ``ViT-T-16``, the CLIP-KD ViT-T/16 student).

Weights files are data, never code: a local checkpoint that open_clip would unpickle is
first read here with ``torch.load(weights_only=True)`` (:func:`rdkd.checkpoints.ensure_loads_as_data`)
and refused with one line if it needs more; inside open_clip's factory every ``torch.load``
(of downloaded weights too) is forced to ``weights_only=True``.

Offline: a spec whose weights or config are not in the local cache needs a download; when
the Hub is unreachable or ``HF_HUB_OFFLINE=1`` is set, loading fails with one line that
says so. Cached copies are used without touching the network.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import open_clip
import torch

from rdkd import checkpoints
from rdkd.errors import UserError
from rdkd.files import atomic_write

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

_REGISTERED_DIR: str | None = None  # where config JSONs given by path are registered


@dataclass(frozen=True)
class ModelSpec:
    """What model to load. See the module docstring for the accepted combinations."""

    name: str | None = None
    pretrained: str | None = None
    config: str | None = None

    def describe(self) -> str:
        """A short form for messages: ``ViT-L-14/openai``; a checkpoint path is left out."""
        base = self.name or (Path(self.config).name if self.config else "?")
        if self.pretrained and not _looks_like_path(self.pretrained):
            return f"{base}/{self.pretrained}"
        return base

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass
class LoadedClip:
    """An open_clip model with everything needed to feed it and to record what it was."""

    model: torch.nn.Module
    preprocess: Callable  # the model's own eval transform (PIL image -> tensor)
    train_preprocess: Callable  # open_clip's training transform for this model
    tokenizer: Callable  # list[str] -> LongTensor [n, context_length]
    preprocess_cfg: dict[str, Any]  # size, mean, std, interpolation, resize_mode, fill_color
    model_config: dict[str, Any]  # open_clip model config (embed_dim, vision_cfg, text_cfg, ...)
    context_length: int
    logit_scale: float  # exp of the model's logit_scale parameter
    embed_dim: int
    weights_sha256: str
    spec: ModelSpec
    info: dict[str, Any] = field(default_factory=dict)


def parse_model_spec(model: str | None, pretrained: str | None = None) -> ModelSpec:
    """Turn CLI strings into a :class:`ModelSpec`.

    ``model`` is an open_clip name, ``hf-hub:...``, ``local-dir:...``, a folder (taken as
    ``local-dir:``) or a path to a ``.json`` model config; ``pretrained`` is a tag or a
    checkpoint path.
    """
    if not model:
        raise UserError("no model given; pass an open_clip model name, hf-hub:org/name or a model-config .json")
    if model.lower().endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        raise UserError(f"{model} is a checkpoint file, not a model: name the model (open_clip name or "
                        f"config .json) and pass the checkpoint as its weights (--pretrained / --init)")
    if model.lower().endswith(".json"):
        if not Path(model).is_file():
            raise UserError(f"model config not found: {model}")
        return ModelSpec(config=model, pretrained=pretrained)
    if not model.startswith(("hf-hub:", "local-dir:")) and Path(model).is_dir():
        model = f"local-dir:{model}"
    if model.startswith(("hf-hub:", "local-dir:")) and pretrained:
        raise UserError(f"{model} brings its own weights; drop --pretrained {pretrained}")
    return ModelSpec(name=model, pretrained=pretrained)


def load_clip(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedClip:
    """Load a model for inference (eval mode, on ``device``) with its preprocessing and tokenizer."""
    loaded = _build(spec, device)
    loaded.model.eval()
    return loaded


def create_student(model: str, init: str | None = None, device: str | torch.device = "cpu") -> LoadedClip:
    """A student to train: ``model`` as in :func:`parse_model_spec`, weights from ``init``
    (a checkpoint path or pretrained tag) or random init when ``init`` is None."""
    loaded = _build(parse_model_spec(model, init), device)
    loaded.model.train()
    return loaded


def export_clip(model: torch.nn.Module, model_config: dict[str, Any], out_dir: str | Path,
                preprocess_cfg: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``model`` so that plain open_clip loads it, without rdkd.

    The folder follows open_clip's Hub layout (what ``open_clip.push_to_hf_hub`` uploads):
    ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
    ``open_clip_model.safetensors``. Load it with::

        open_clip.create_model_and_transforms("local-dir:OUT_DIR")
        open_clip.get_tokenizer("local-dir:OUT_DIR")

    or upload the folder to the Hub and use ``hf-hub:org/name``. ``model_config.json`` (the
    bare model config) is written too, for ``open_clip.add_model_config`` with
    ``pretrained=OUT_DIR/open_clip_model.safetensors``.
    """
    from safetensors.torch import save as safetensors_bytes

    out = Path(out_dir)
    if preprocess_cfg is None:
        preprocess_cfg = dict(getattr(getattr(model, "visual", None), "preprocess_cfg", {}) or {})
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    weights = out / "open_clip_model.safetensors"
    config = out / "open_clip_config.json"
    bare = out / "model_config.json"
    # bytes written from Python, so that a full disk raises an OSError (reported with the
    # path by rdkd.files.writing) rather than an error of safetensors' own file writer
    atomic_write(weights, lambda tmp: tmp.write_bytes(safetensors_bytes(state)))
    atomic_write(config, lambda tmp: tmp.write_text(json.dumps(
        {"model_cfg": model_config, "preprocess_cfg": _jsonable(preprocess_cfg)}, indent=2)))
    atomic_write(bare, lambda tmp: tmp.write_text(json.dumps(model_config, indent=2)))
    return {"dir": out, "weights": weights, "open_clip_config": config, "model_config": bare}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over parameter names, dtypes, shapes and bytes, in state_dict order."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --- resolution ------------------------------------------------------------------------------


@dataclass
class _Resolved:
    name: str  # what open_clip's factory gets as model_name
    pretrained: str | None  # what it gets as pretrained (tag or file), None for schemas
    model_config: dict[str, Any]
    preprocess_overrides: dict[str, Any]
    weights_file: str | None  # a local file known before loading, else None
    needs_hub: bool  # weights or config come through the Hugging Face cache / a download
    force_quick_gelu: bool = False


def _resolve(spec: ModelSpec) -> _Resolved:
    if spec.config:
        cfg, preprocess = _read_config_json(spec.config)
        if spec.pretrained and not Path(spec.pretrained).is_file():
            raise UserError(f"checkpoint not found: {spec.pretrained}")
        name = _register_config(cfg, Path(spec.config).stem)
        return _Resolved(name, spec.pretrained, cfg, preprocess, spec.pretrained, False)
    name = spec.name or ""
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise UserError(f"{name}: no open_clip_config.json in that folder")
        cfg, _ = _read_config_json(str(config_path))
        weights = open_clip.factory._find_checkpoint_in_dir(folder)
        return _Resolved(name, None, cfg, {}, weights, False)
    if name.startswith("hf-hub:"):
        return _Resolved(name, None, {}, {}, None, True)
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown open_clip model {name!r}{hint}")
    cfg = open_clip.get_model_config(name)
    pretrained = spec.pretrained
    if not pretrained:
        return _Resolved(name, None, cfg, {}, None, False)
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        # open_clip 3 only warns when a tag was trained with QuickGELU and the model config
        # says GELU (ViT-L-14 + openai): the weights would run with the wrong activation.
        quick_gelu = bool(tag_cfg.get("quick_gelu")) and not cfg.get("quick_gelu", False)
        if quick_gelu:
            cfg = {**cfg, "quick_gelu": True}
        return _Resolved(name, pretrained, cfg, {}, None, True, force_quick_gelu=quick_gelu)
    if Path(pretrained).is_file():
        return _Resolved(name, pretrained, cfg, {}, pretrained, False)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if _looks_like_path(pretrained) or not tags:
        raise UserError(f"checkpoint not found: {pretrained}")
    raise UserError(f"{name} has no pretrained tag {pretrained!r} (known: {', '.join(tags)})")


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"))


def _read_config_json(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read model config {path}: {err}") from None
    preprocess = {}
    if isinstance(data, dict) and "model_cfg" in data:
        preprocess = data.get("preprocess_cfg") or {}
        data = data["model_cfg"]
    if not isinstance(data, dict) or not all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"model config {path} is not an open_clip config (needs embed_dim, vision_cfg, text_cfg)")
    return data, preprocess


def _register_config(cfg: dict[str, Any], stem: str) -> str:
    """Register a config with open_clip's factory under a name that cannot shadow another."""
    global _REGISTERED_DIR
    existing = open_clip.get_model_config(stem)
    if existing == cfg:
        return stem
    name = stem if existing is None else f"{stem}-{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]}"
    if open_clip.get_model_config(name) == cfg:
        return name
    if _REGISTERED_DIR is None:
        _REGISTERED_DIR = tempfile.mkdtemp(prefix="rdkd-model-configs-")
        atexit.register(shutil.rmtree, _REGISTERED_DIR, ignore_errors=True)
    # open_clip's registry is filled from files: add_model_config(path) reads them by stem.
    path = Path(_REGISTERED_DIR) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


# --- building --------------------------------------------------------------------------------


def _build(spec: ModelSpec, device: str | torch.device) -> LoadedClip:
    resolved = _resolve(spec)
    if resolved.weights_file:  # a local file rdkd hands to open_clip: data only
        checkpoints.ensure_loads_as_data(resolved.weights_file)
    overrides = {
        "force_quick_gelu": resolved.force_quick_gelu,
        "image_mean": resolved.preprocess_overrides.get("mean"),
        "image_std": resolved.preprocess_overrides.get("std"),
        "image_interpolation": resolved.preprocess_overrides.get("interpolation"),
        "image_resize_mode": resolved.preprocess_overrides.get("resize_mode"),
    }
    try:
        if resolved.needs_hub:
            model, train_pp, eval_pp, tokenizer = _create_from_hub(spec, resolved, device, overrides)
        else:
            model, train_pp, eval_pp, tokenizer = _create(resolved, device, overrides)
    except UserError:
        raise
    except Exception as err:
        # The factory is the boundary to user-supplied files: open_clip reports a checkpoint
        # that does not fit with RuntimeError (load_state_dict) or AssertionError (position
        # embedding resizing), and torch.load a corrupt file with almost any exception type.
        raise UserError(_factory_error_line(spec, resolved, err)) from None

    weights_file = resolved.weights_file
    if resolved.needs_hub:
        weights_file = _cached_weights_file(spec)
    weights_sha = file_sha256(weights_file) if weights_file else state_dict_sha256(model)
    model_config = resolved.model_config or _hub_model_config(spec.name or "")
    preprocess_cfg = _jsonable(dict(model.visual.preprocess_cfg))
    context_length = int(getattr(model, "context_length", 0) or model_config["text_cfg"].get("context_length", 77))
    logit_scale = float(model.logit_scale.detach().float().exp().item())
    embed_dim = int(model_config["embed_dim"])
    info = {
        "spec": spec.to_dict(),
        "open_clip_name": resolved.name,
        "open_clip_version": open_clip.__version__,
        "weights_file": str(weights_file) if weights_file else None,
        "weights_sha256": weights_sha,
        "logit_scale": logit_scale,
        "embed_dim": embed_dim,
        "preprocess": preprocess_cfg,
        # SimpleTokenizer (CLIP BPE), SigLipTokenizer, or the Hugging Face tokenizer's name.
        "tokenizer": model_config.get("text_cfg", {}).get("hf_tokenizer_name") or type(tokenizer).__name__,
        "context_length": context_length,
        "model_config": model_config,
    }
    return LoadedClip(model, eval_pp, train_pp, tokenizer, preprocess_cfg, model_config, context_length,
                      logit_scale, embed_dim, weights_sha, spec, info)


def _create(resolved: _Resolved, device, overrides):
    with _quiet_open_clip(), checkpoints.weights_only_loads():
        model, train_pp, eval_pp = open_clip.create_model_and_transforms(
            resolved.name, pretrained=resolved.pretrained, device=device, **overrides)
        tokenizer = open_clip.get_tokenizer(resolved.name)
    return model, train_pp, eval_pp, tokenizer


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs failed download attempts and "initialized randomly" on the root logger;
    rdkd reports both itself (a one-line error; ``info["weights_file"]`` is None)."""
    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


def _create_from_hub(spec: ModelSpec, resolved: _Resolved, device, overrides):
    """Try the local cache first, with the network off; download only when allowed."""
    import huggingface_hub.constants as hub

    try:
        with _hub_offline():
            return _create(resolved, device, overrides)
    except (RuntimeError, ValueError, OSError) as err:
        if not _is_download_failure(err):
            raise
        if hub.is_offline_mode():
            raise UserError(f"model {spec.describe()} needs a download from the hub and this machine is offline "
                            f"(HF_HUB_OFFLINE is set, no cached copy); pass a local checkpoint") from None
        unreachable = _hub_unreachable(hub.ENDPOINT)
        if unreachable:
            raise UserError(f"model {spec.describe()} needs a download from the hub and this machine is offline "
                            f"({unreachable}, no cached copy); pass a local checkpoint") from None
    try:
        return _create(resolved, device, overrides)
    except (RuntimeError, ValueError, OSError) as err:
        if _is_download_failure(err):
            raise UserError(f"model {spec.describe()} needs a download from the hub and it failed "
                            f"(offline? no cached copy); pass a local checkpoint") from None
        raise


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached, or None. huggingface_hub retries a failed connection
    with backoff for about 25 s per file; one quick connection attempt first answers at once.
    Behind a proxy the direct attempt says nothing, so it is skipped."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"{host} unreachable: {err.strerror or type(err).__name__}"
    return None


@contextlib.contextmanager
def _hub_offline():
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _is_download_failure(err: BaseException) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("download", "hf hub", "offline", "connect", "urlopen", "resolve"))


def _cached_weights_file(spec: ModelSpec) -> str | None:
    """The cached weights file a hub spec loaded from (for its sha256)."""
    from open_clip import pretrained as oc_pretrained

    with _hub_offline():
        try:
            if spec.name and spec.name.startswith("hf-hub:"):
                return oc_pretrained.download_pretrained_from_hf(spec.name[len("hf-hub:"):])
            cfg = open_clip.get_pretrained_cfg(spec.name or "", spec.pretrained or "")
            return oc_pretrained.download_pretrained(cfg) or None
        except Exception:  # the model loaded, so the copy exists; fall back to hashing tensors
            return None


def _hub_model_config(name: str) -> dict[str, Any]:
    with _hub_offline():
        return open_clip.get_model_config(name) or {}


def _factory_error_line(spec: ModelSpec, resolved: _Resolved, err: BaseException) -> str:
    text = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}" if str(err).strip() else type(err).__name__
    mismatch = ("loading state_dict", "size mismatch", "Missing key", "Unexpected key")
    checkpoint = resolved.pretrained or resolved.weights_file
    if checkpoint and (isinstance(err, AssertionError)
                       or (isinstance(err, RuntimeError) and any(m in str(err) for m in mismatch))):
        return f"checkpoint {checkpoint} does not fit model {spec.describe()}: {text[:200]}"
    if checkpoint:
        return f"cannot load checkpoint {checkpoint} for model {spec.describe()}: {text[:200]}"
    return f"cannot create model {spec.describe()}: {text[:200]}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
