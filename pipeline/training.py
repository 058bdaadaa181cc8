"""Building blocks of student training, usable from any training loop.

- :class:`PairDataset` joins a dataset with a teacher cache by key and yields one
  (image, caption) pair per sample: the image as the student sees it (a replayed cached
  view, or the student's own RandomResizedCrop when there is no cache), the caption
  tokenised, and the cache rows of the teacher embeddings that belong to exactly that view
  and that caption.
- :class:`EpochBatchSampler` shards and shuffles deterministically per epoch (seed +
  epoch), and can start in the middle of an epoch, which is what makes resume exact.
- the optimizer (open_clip's decay rule), the warm-up + cosine schedule, atomic checkpoint
  files and the RNG state they carry, and the per-step metrics log.

Every random choice a sample needs (view, caption, crop) derives from (seed, epoch,
index), never from a worker's RNG state, so any number of DataLoader workers, processes
or interruptions give the same samples.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from rdkd.errors import SampleError, UserError
from rdkd.files import atomic_write

# CLIP-KD's train augmentation: RandomResizedCrop with scale (0.9, 1.0).
DEFAULT_CROP_SCALE = (0.9, 1.0)
# How many neighbours a sample whose image fails to decode may fall back to before the
# run gives up: a dataset where that many images in a row are broken is not usable.
MAX_CONSECUTIVE_BAD_SAMPLES = 64


class LossNotFinite(UserError):
    """The loss became NaN or inf; the message names the step and the term."""


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: a pure function of its coordinates."""
    return np.random.default_rng([seed, epoch, index])


@dataclass(frozen=True)
class ImageCfg:
    """The student's own image preprocessing (open_clip's ``preprocess_cfg`` fields we use)."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "ImageCfg":
        """Read the preprocessing open_clip attached to the model (``model.visual.preprocess_cfg``)."""
        cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
        if not cfg:
            raise UserError("the student model carries no open_clip preprocess_cfg")
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=cfg.get("interpolation") or "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
        )

    def to_dict(self) -> dict:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


class PairDataset(torch.utils.data.Dataset):
    """(image, caption) training pairs of a dataset, joined by key with a teacher cache.

    Items are addressed by ``(epoch, position)`` (what :class:`EpochBatchSampler` yields);
    ``position`` indexes the usable entries: dataset entries the cache holds and did not
    reject (without a cache: every entry). An image that fails to decode is skipped: the
    item falls back to the next usable entry and reports the skipped key with its reason.
    """

    def __init__(self, data: Any, tokenizer: Callable, image_cfg: ImageCfg, seed: int,
                 cache: Any = None, crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE):
        self.data = data
        self.tokenizer = tokenizer
        self.image_cfg = image_cfg
        self.seed = int(seed)
        self.cache = cache
        self.skipped_at_join: dict[str, int] = {}
        if cache is None:
            self.entries = np.arange(len(data), dtype=np.int64)
            self.image_rows = self.text_rows = None
        else:
            self._join(data, cache)
        if len(self.entries) == 0:
            raise UserError("no usable training samples: the dataset is empty or every entry was rejected")
        # View 0 of a cache is the teacher's open_clip eval view; the student's own eval
        # transform shows the same region when both resize the same way, so it replays it
        # exactly (at the student's size). Other views: the recorded crop box and flip.
        self._eval_view0 = cache is not None and (
            cache.manifest.get("preprocess", {}).get("resize_mode") or "shortest") == image_cfg.resize_mode
        # Built lazily (and per worker): open_clip's train and eval transforms with the
        # student's size, mean and std (train: CLIP-KD's crop scale).
        self._crop_scale = crop_scale
        self._augment = None
        self._eval = None
        self._normalize = None

    def _join(self, data: Any, cache: Any) -> None:
        """Rows of every usable entry, as flat arrays (no per-entry Python objects: a
        CC12M-size join stays a few hundred MB)."""
        rejected = set(cache.rejected_keys)
        entries, img_start, img_count, txt_start, txt_count = [], [], [], [], []
        for i, key in enumerate(data.keys):
            if key in rejected:
                self._count_join_skip("rejected by the cache")
                continue
            found = cache.find(key)
            if found is None:
                self._count_join_skip("not in the cache")
                continue
            entries.append(i)
            img_start.append(found.image_rows.start)
            img_count.append(len(found.image_rows))
            txt_start.append(found.text_rows.start)
            txt_count.append(len(found.text_rows))
        self.entries = np.asarray(entries, dtype=np.int64)
        self.image_rows = (np.asarray(img_start, dtype=np.int64), np.asarray(img_count, dtype=np.int32))
        self.text_rows = (np.asarray(txt_start, dtype=np.int64), np.asarray(txt_count, dtype=np.int32))

    def _count_join_skip(self, reason: str) -> None:
        self.skipped_at_join[reason] = self.skipped_at_join.get(reason, 0) + 1

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict:
        """Picklable for spawn/forkserver DataLoader workers: the memory-mapped cache is
        reopened from its folder in the worker, the transforms are rebuilt there."""
        state = dict(self.__dict__, _augment=None, _eval=None, _normalize=None)
        if self.cache is not None:
            state["cache"] = None
            state["_cache_root"] = str(self.cache.root)
        return state

    def __setstate__(self, state: dict) -> None:
        root = state.pop("_cache_root", None)
        self.__dict__.update(state)
        if root is not None:
            from rdkd.cache import TeacherCache

            self.cache = TeacherCache.open(root)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, position = item
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_BAD_SAMPLES):
            pos = (position + attempt) % len(self.entries)
            try:
                sample = self._load(epoch, pos)
            except SampleError as err:
                index = int(self.entries[pos])
                skipped.append((self.data.keys[index], err.reason))
                continue
            sample["skipped"] = skipped
            return sample
        raise UserError(f"{MAX_CONSECUTIVE_BAD_SAMPLES} images in a row failed to decode "
                        f"(last: {skipped[-1][0]}: {skipped[-1][1]}); check the dataset")

    def _load(self, epoch: int, pos: int) -> dict:
        from rdkd.cache.views import render_view
        from rdkd.data import decode_image

        index = int(self.entries[pos])
        rng = sample_rng(self.seed, epoch, index)
        captions = self.data.captions(index)
        caption_choice = int(rng.integers(len(captions)))
        image = decode_image(self.data.read_image_bytes(index))
        if self.cache is None:
            pixels = self._augmented(image, int(rng.integers(2**63 - 1)))
            image_row = text_row = -1
        else:
            start, count = self.image_rows[0][pos], self.image_rows[1][pos]
            view = int(rng.integers(count))
            image_row = int(start + view)
            text_row = int(self.text_rows[0][pos] + caption_choice)
            if view == 0 and self._eval_view0:
                pixels = self._evaluated(image)
            else:
                box, flip = self.cache.view_params(np.asarray([image_row], dtype=np.int64))
                pixels = self._normalized(render_view(image, box[0].tolist(), bool(flip[0]),
                                                      self.image_cfg.size, self.image_cfg.interpolation))
        text = self.tokenizer([captions[caption_choice]])[0]
        return {"image": pixels, "text": text, "index": index,
                "image_row": image_row, "text_row": text_row}

    def _augmented(self, image: Image.Image, torch_seed: int) -> torch.Tensor:
        """open_clip's train transform, its torch RNG seeded from the sample's own stream."""
        if self._augment is None:
            import open_clip

            cfg = self.image_cfg
            self._augment = open_clip.image_transform(
                cfg.size, is_train=True, mean=cfg.mean, std=cfg.std,
                interpolation=cfg.interpolation, aug_cfg={"scale": self._crop_scale})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            return self._augment(image)

    def _evaluated(self, image: Image.Image) -> torch.Tensor:
        if self._eval is None:
            import open_clip

            cfg = self.image_cfg
            self._eval = open_clip.image_transform(
                cfg.size, is_train=False, mean=cfg.mean, std=cfg.std,
                interpolation=cfg.interpolation, resize_mode=cfg.resize_mode)
        return self._eval(image)

    def _normalized(self, view: Image.Image) -> torch.Tensor:
        if self._normalize is None:
            from torchvision import transforms

            self._normalize = transforms.Compose([
                transforms.ToTensor(), transforms.Normalize(self.image_cfg.mean, self.image_cfg.std)])
        return self._normalize(view)


def collate_pairs(samples: list[dict]) -> dict:
    """Stack a list of :meth:`PairDataset.__getitem__` results into one batch."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "text": torch.stack([s["text"] for s in samples]),
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "image_row": np.asarray([s["image_row"] for s in samples], dtype=np.int64),
        "text_row": np.asarray([s["text_row"] for s in samples], dtype=np.int64),
        "skipped": [skip for s in samples for skip in s["skipped"]],
    }


class EpochBatchSampler(torch.utils.data.Sampler):
    """Local batches of ``(epoch, position)`` items: shuffled with seed + epoch and sharded
    over ``world`` ranks by torch's DistributedSampler, incomplete batches dropped (every
    step sees a full global batch). Iteration runs from ``start`` = (epoch, step in epoch)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: tuple[int, int] = (0, 0)):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.start = start
        self.steps_per_epoch = math.ceil(num_samples / world) // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the global batch ({batch_size * world}) is larger than the "
                            f"{num_samples} usable samples")

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        shard = DistributedSampler(range(self.num_samples), num_replicas=self.world,
                                   rank=self.rank, shuffle=True, seed=self.seed, drop_last=False)
        shard.set_epoch(epoch)
        order = list(shard)
        return [[(epoch, p) for p in order[b * self.batch_size:(b + 1) * self.batch_size]]
                for b in range(self.steps_per_epoch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, step = self.start
        while True:
            yield from self.epoch_batches(epoch)[step:]
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:  # an endless stream; the training loop counts steps
        return 2**62


def is_decayed(name: str, param: torch.nn.Parameter) -> bool:
    """open_clip's rule: no weight decay on gains, biases, norms and the logit scale."""
    return not (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
                or "logit_scale" in name)


def param_groups(model: torch.nn.Module, loss_module: torch.nn.Module,
                 weight_decay: float) -> list[dict]:
    """Student decay / no-decay groups plus the loss module's own parameters (projection
    heads, learnable scales a_I, a_T, a_X) in their own groups: the scales never decay."""
    groups = []
    for owner, module in (("student", model), ("loss", loss_module)):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        decay = [p for n, p in named if is_decayed(n, p)]
        no_decay = [p for n, p in named if not is_decayed(n, p)]
        groups.append({"name": f"{owner}_decay", "params": decay, "weight_decay": weight_decay})
        groups.append({"name": f"{owner}_no_decay", "params": no_decay, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, loss_module: torch.nn.Module, lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.98),
                    eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW with CLIP-KD's settings (lr 1e-3, wd 0.1, betas (0.9, 0.98), eps 1e-6)."""
    return torch.optim.AdamW(param_groups(model, loss_module, weight_decay), lr=lr,
                             betas=betas, eps=eps)


class WarmupCosine:
    """LR factor: linear warm-up from lr/warmup to lr over ``warmup`` steps, then cosine to 0
    at ``total`` (open_clip's ``cosine_lr`` shape). A class, not a lambda, so that
    LambdaLR's state_dict holds it."""

    def __init__(self, warmup: int, total: int):
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        decay_steps = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int,
                    total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total))


def rng_state() -> dict:
    """Every RNG a training process touches (torch CPU and CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically (a reader never sees a partial checkpoint)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (it holds RNG states and numpy
    arrays, hence ``weights_only=False``: only load checkpoints you trust)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None


class TeacherForwardCounter:
    """Counts calls of open_clip models outside the trained ones (student, loss module).

    While active, global module hooks see every module call in the process. Training from a
    cache runs no open_clip model but the student, so any outermost call of another one (a
    teacher's forward, or the tower that its ``encode_image`` / ``encode_text`` runs) is
    counted; a run that never touches a teacher ends with zero.
    """

    def __init__(self, *trained: torch.nn.Module):
        self.count = 0
        self._trained = {id(m) for module in trained for m in module.modules()}
        self._depth = 0
        self._handles: list = []

    def _foreign(self, module: torch.nn.Module) -> bool:
        # open_clip's models and towers only: torchvision transforms are modules too
        return type(module).__module__.startswith("open_clip") and id(module) not in self._trained

    def _before(self, module: torch.nn.Module, args: Any) -> None:
        if self._foreign(module):
            if self._depth == 0:
                self.count += 1
            self._depth += 1

    def _after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._foreign(module):
            self._depth -= 1

    def __enter__(self) -> "TeacherForwardCounter":
        hooks = torch.nn.modules.module
        self._handles = [hooks.register_module_forward_pre_hook(self._before),
                         hooks.register_module_forward_hook(self._after)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


class MetricsLog:
    """Per-step metrics: one JSON line per step in ``metrics.jsonl`` and TensorBoard scalars.
    On resume the JSONL keeps only lines before the resumed step, so the log reads as one run;
    a fresh run replaces the logs of an earlier run in the same folder."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
            shutil.rmtree(log_dir / "tb", ignore_errors=True)  # or TensorBoard shows both runs as one
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(log_dir / "tb"),
                                 purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()
