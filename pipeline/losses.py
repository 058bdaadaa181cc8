"""The CLIP-RD loss family: one pure function per term, the `DistillLoss` module and presets.

Notation and formulas follow the paper brief (shared/paper/CLIP-RD.md):

- ``S_I, S_T``: student image / text embeddings, L2-normalised (student space, dim d_s).
- ``P_I, P_T``: the student embeddings as compared with teacher vectors: ``S`` itself when
  d_s == d_t, otherwise ``normalize(head(S))`` with one ``Linear(d_s -> d_t)`` head per
  modality (normalised *after* the head).
- ``T_I, T_T``: teacher embeddings, L2-normalised, frozen.
- ``CE(L)``: row-wise cross-entropy of logits ``L`` against the diagonal.
- ``KL(A -> B)``: ``sum_j p_j (log p_j - log q_j)`` with ``p = softmax(A)`` (target, always
  detached) and ``q = softmax(B)``, averaged over rows, temperature 1.

Every pure term function takes L2-normalised tensors (teacher arguments first, then
student) and scales that are plain multipliers (already exponentiated where that applies),
and returns a scalar tensor. In ``fd``, ``icl``, ``vrd`` and ``xrd`` the ``s_*`` arguments
are ``P`` (the student vectors that sit beside teacher vectors); in ``clip_task``, ``crd``,
``soft_target_kd`` and ``affinity_mimic`` they are ``S``.

The terms share six similarity matrices. `Relations` computes each one once, on first use,
and the term functions are written against it; the public functions wrap their arguments
in a fresh `Relations`, `DistillLoss` builds one per step and feeds every active term from
it. So the reference API and the training path are the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from rdkd.errors import UserError

__all__ = [
    "clip_task", "crd", "fd", "icl", "vrd", "xrd", "soft_target_kd", "affinity_mimic",
    "Relations", "Scales", "DistillLoss", "TERMS", "PRESETS", "weights_for",
    "parse_weight_overrides", "INIT_SCALE", "MAX_SCALE",
]

# ln(1/0.07): CLIP's initial logit scale, also the init of a_I, a_T, a_X in the reference recipe.
INIT_SCALE = math.log(1 / 0.07)
# CLIP's cap on exp(logit_scale).
MAX_SCALE = 100.0

Tensor = torch.Tensor
# A multiplier of similarities: a Python number or a 0-dim tensor (learnable or not).
Scale = torch.Tensor | float


# ---------------------------------------------------------------------------------------
# Building blocks


def _diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """CE(L): row i's target class is column i; mean over rows."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def _symmetric_ce(logits: torch.Tensor) -> torch.Tensor:
    """1/2 [CE(L) + CE(L^T)]."""
    return 0.5 * (_diagonal_ce(logits) + _diagonal_ce(logits.T))


def _kl(target_logits: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """KL(target -> input), batchmean, temperature 1, the target side detached.

    Both sides enter as log-probabilities (log_softmax), so no log of a rounded-off
    probability is ever taken; a target probability that underflows to 0 contributes
    exp(log p) * (log p - log q) = 0 * finite = 0, the limit of p log p.
    """
    log_p = F.log_softmax(target_logits.detach(), dim=1)
    log_q = F.log_softmax(input_logits, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _soft_ce(target_logits: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy -sum_j p_j log q_j, mean over rows, the target detached."""
    p = F.softmax(target_logits.detach(), dim=1)
    return -(p * F.log_softmax(input_logits, dim=1)).sum(dim=1).mean()


class Relations:
    """The similarity matrices of one batch, each computed at most once.

    ``s_img``/``s_txt`` are the student embeddings in student space (S), ``p_img``/``p_txt``
    the student embeddings as compared with teacher vectors (P). Either pair may be left
    out when no term that needs it is evaluated.
    """

    def __init__(
        self,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        s_img: torch.Tensor | None = None,
        s_txt: torch.Tensor | None = None,
        p_img: torch.Tensor | None = None,
        p_txt: torch.Tensor | None = None,
    ):
        self.t_img, self.t_txt = t_img, t_txt
        self.s_img, self.s_txt = s_img, s_txt
        self.p_img, self.p_txt = p_img, p_txt

    @cached_property
    def student(self) -> torch.Tensor:
        """S_I S_T^T."""
        return self.s_img @ self.s_txt.T

    @cached_property
    def teacher(self) -> torch.Tensor:
        """T_I T_T^T (no gradient: the teacher is frozen)."""
        return (self.t_img @ self.t_txt.T).detach()

    @cached_property
    def image(self) -> torch.Tensor:
        """T_I P_I^T: row i is teacher image i against every student image."""
        return self.t_img @ self.p_img.T

    @cached_property
    def text(self) -> torch.Tensor:
        """T_T P_T^T: row i is teacher text i against every student text."""
        return self.t_txt @ self.p_txt.T

    @cached_property
    def teacher_image_student_text(self) -> torch.Tensor:
        """T_I P_T^T."""
        return self.t_img @ self.p_txt.T

    @cached_property
    def teacher_text_student_image(self) -> torch.Tensor:
        """T_T P_I^T."""
        return self.t_txt @ self.p_img.T


@dataclass(frozen=True)
class Scales:
    """The multipliers the terms use, already in effect (exp'd and clamped where that applies).

    ``student`` = s, ``teacher`` = tau, ``img`` = a_I, ``txt`` = a_T, ``cross`` = a_X.
    """

    student: Scale | None = None
    teacher: Scale | None = None
    img: Scale | None = None
    txt: Scale | None = None
    cross: Scale | None = None


# ---------------------------------------------------------------------------------------
# The terms, written against shared Relations. Each takes (relations, scales).


def _task(rel: Relations, sc: Scales) -> torch.Tensor:
    # 1/2 [CE(s S_I S_T^T) + CE(s S_T S_I^T)]
    return _symmetric_ce(sc.student * rel.student)


def _crd(rel: Relations, sc: Scales) -> torch.Tensor:
    # 1/2 [KL(tau T_I T_T^T -> s S_I S_T^T) + KL(tau T_T T_I^T -> s S_T S_I^T)]
    teacher = sc.teacher * rel.teacher
    student = sc.student * rel.student
    return 0.5 * (_kl(teacher, student) + _kl(teacher.T, student.T))


def _fd(rel: Relations, sc: Scales) -> torch.Tensor:
    # MSE(P_I, T_I) + MSE(P_T, T_T), each a mean over all N x d_t elements
    return F.mse_loss(rel.p_img, rel.t_img) + F.mse_loss(rel.p_txt, rel.t_txt)


def _icl(rel: Relations, sc: Scales) -> torch.Tensor:
    # 1/2 [CE(a_X P_I T_T^T) + CE(a_X P_T T_I^T)]; P_I T_T^T = (T_T P_I^T)^T
    return 0.5 * (
        _diagonal_ce(sc.cross * rel.teacher_text_student_image.T)
        + _diagonal_ce(sc.cross * rel.teacher_image_student_text.T)
    )


def _vrd(rel: Relations, sc: Scales) -> torch.Tensor:
    m_img = sc.img * rel.image  # M_I = a_I T_I P_I^T
    m_txt = sc.txt * rel.text  # M_T = a_T T_T P_T^T
    # the text side is the (detached) target, in both normalisations
    kl = 0.5 * (_kl(m_txt, m_img) + _kl(m_txt.T, m_img.T))
    ce = _symmetric_ce(m_img) + _symmetric_ce(m_txt)
    return kl + ce


def _xrd(rel: Relations, sc: Scales) -> torch.Tensor:
    a = sc.cross * rel.teacher_image_student_text  # A = a_X T_I P_T^T
    b = sc.cross * rel.teacher_text_student_image  # B = a_X T_T P_I^T
    return 0.25 * (_kl(b, a) + _kl(a, b) + _kl(b.T, a.T) + _kl(a.T, b.T))


def _soft_target(rel: Relations, sc: Scales) -> torch.Tensor:
    # image->text and text->image soft cross-entropy against the teacher's affinities
    teacher = sc.teacher * rel.teacher
    student = sc.student * rel.student
    return 0.5 * (_soft_ce(teacher, student) + _soft_ce(teacher.T, student.T))


# ---------------------------------------------------------------------------------------
# The public reference API: one pure function per term.


def clip_task(s_img: Tensor, s_txt: Tensor, s_scale: Scale) -> Tensor:
    """CLIP's contrastive task loss 1/2 [CE(s S_I S_T^T) + CE(s S_T S_I^T)]."""
    return _task(Relations(None, None, s_img, s_txt), Scales(student=s_scale))


def crd(t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, t_scale: Scale, s_scale: Scale) -> Tensor:
    """CLIP-KD's contrastive relational distillation (CRD, also "HRD").

    1/2 [KL(tau T_I T_T^T -> s S_I S_T^T) + KL(tau T_T T_I^T -> s S_T S_I^T)]; ``s_*`` are S.
    """
    return _crd(Relations(t_img, t_txt, s_img, s_txt), Scales(student=s_scale, teacher=t_scale))


def fd(t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor) -> Tensor:
    """Feature distillation MSE(P_I, T_I) + MSE(P_T, T_T); ``s_*`` are P."""
    return _fd(Relations(t_img, t_txt, p_img=s_img, p_txt=s_txt), Scales())


def icl(t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, scale_cross: Scale) -> Tensor:
    """Interactive contrastive learning 1/2 [CE(a_X P_I T_T^T) + CE(a_X P_T T_I^T)]; ``s_*`` are P."""
    return _icl(Relations(t_img, t_txt, p_img=s_img, p_txt=s_txt), Scales(cross=scale_cross))


def vrd(
    t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, scale_img: Scale, scale_txt: Scale
) -> Tensor:
    """Vertical relational distillation: the KL part plus both intra-modal CE parts.

    With M_I = a_I T_I P_I^T and M_T = a_T T_T P_T^T (``s_*`` are P):
    1/2 [KL(M_T -> M_I) + KL(M_T^T -> M_I^T)] + 1/2 [CE(M_I) + CE(M_I^T)] + 1/2 [CE(M_T) + CE(M_T^T)].
    """
    return _vrd(
        Relations(t_img, t_txt, p_img=s_img, p_txt=s_txt), Scales(img=scale_img, txt=scale_txt)
    )


def xrd(t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, scale_cross: Scale) -> Tensor:
    """Cross relational distillation, a symmetric KL between A = a_X T_I P_T^T and B = a_X T_T P_I^T.

    1/4 [KL(B -> A) + KL(A -> B) + KL(B^T -> A^T) + KL(A^T -> B^T)]; ``s_*`` are P.
    """
    return _xrd(Relations(t_img, t_txt, p_img=s_img, p_txt=s_txt), Scales(cross=scale_cross))


def soft_target_kd(
    t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, t_scale: Scale, s_scale: Scale
) -> Tensor:
    """open_clip's ``DistillClipLoss`` distillation part.

    1/2 [softCE(tau T_I T_T^T -> s S_I S_T^T) + softCE(tau T_T T_I^T -> s S_T S_I^T)] with
    softCE(A -> B) = -mean_i sum_j softmax(A)_ij log softmax(B)_ij; ``s_*`` are S. It differs
    from `crd` by the teacher's entropy only, a constant: same gradients, different value.
    """
    return _soft_target(
        Relations(t_img, t_txt, s_img, s_txt), Scales(student=s_scale, teacher=t_scale)
    )


def affinity_mimic(
    t_img: Tensor, t_txt: Tensor, s_img: Tensor, s_txt: Tensor, t_scale: Scale, s_scale: Scale
) -> Tensor:
    """TinyCLIP's affinity mimicking (Wu et al., ICCV 2023).

    The student's image-to-text and text-to-image affinity distributions (row softmaxes of
    s S_I S_T^T and its transpose) are matched to the teacher's (tau T_I T_T^T) by
    cross-entropy, the two directions averaged. As published this is the same formula as
    open_clip's soft-target loss, so it is computed by it; what sets the TinyCLIP baseline
    apart is its preset (`tinyclip`: no task loss, as TinyCLIP's default distillation_alpha=1).
    """
    return soft_target_kd(t_img, t_txt, s_img, s_txt, t_scale, s_scale)


# ---------------------------------------------------------------------------------------
# Terms, presets and weights


@dataclass(frozen=True)
class Term:
    name: str
    compute: Callable[[Relations, Scales], torch.Tensor]
    uses_teacher: bool  # needs cached teacher embeddings
    uses_projection: bool  # compares student vectors with teacher vectors (P, heads)
    scales: tuple[str, ...]  # learnable loss scales it uses: "img", "txt", "cross"
    description: str


TERMS: dict[str, Term] = {
    t.name: t
    for t in (
        Term("task", _task, False, False, (), "CLIP contrastive loss of the student"),
        Term("crd", _crd, True, False, (), "CLIP-KD contrastive relational distillation"),
        Term("fd", _fd, True, True, (), "feature distillation (MSE)"),
        Term("icl", _icl, True, True, ("cross",), "interactive contrastive learning"),
        Term("vrd", _vrd, True, True, ("img", "txt"), "vertical relational distillation"),
        Term("xrd", _xrd, True, True, ("cross",), "cross relational distillation"),
        Term("soft_target", _soft_target, True, False, (), "open_clip DistillClipLoss soft targets"),
        Term("affinity", _soft_target, True, False, (), "TinyCLIP affinity mimicking"),
    )
}

# The presets of the paper brief, plus three baselines:
# - distill: open_clip's DistillClipLoss (task + soft targets, both weight 1);
# - tinyclip: TinyCLIP's affinity mimicking alone (its default distillation_alpha=1 drops the
#   task loss);
# - mobileclip: MobileCLIP's reinforced-data loss with one teacher, (1 - lambda) task +
#   lambda KL(teacher -> student) at the teacher's fixed temperature (the cache's), which is
#   CRD; lambda = 0.75 here, `task=0, crd=1` gives lambda = 1.
_CLIPKD = {"task": 1.0, "crd": 1.0, "icl": 1.0, "fd": 2000.0}
PRESETS: dict[str, dict[str, float]] = {
    "clip": {"task": 1.0},
    "crd": {"task": 1.0, "crd": 1.0},
    "fd": {"task": 1.0, "fd": 2000.0},
    "icl": {"task": 1.0, "icl": 1.0},
    "clipkd": dict(_CLIPKD),
    "vrd": {**_CLIPKD, "vrd": 1.0},
    "xrd": {**_CLIPKD, "xrd": 1.0},
    "cliprd": {**_CLIPKD, "vrd": 1.0, "xrd": 1.0},
    "distill": {"task": 1.0, "soft_target": 1.0},
    "tinyclip": {"affinity": 1.0},
    "mobileclip": {"task": 0.25, "crd": 0.75},
}


def weights_for(preset: str, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """The term weights of ``preset`` with ``overrides`` applied, zero weights dropped.

    Any term may be overridden, also one the preset does not contain (it is added); a weight
    of 0 removes a term. Raises `UserError` for an unknown preset or term name, a negative or
    non-finite weight, or when no term is left.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown loss preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return _checked_weights({**PRESETS[preset], **(overrides or {})}, f"loss preset {preset!r}")


def _checked_weights(weights: Mapping[str, float], what: str = "the loss") -> dict[str, float]:
    """Validate term names and weights; drop zeros; keep the canonical term order."""
    for name, value in weights.items():
        if name not in TERMS:
            raise UserError(f"unknown loss term {name!r}; valid terms: {', '.join(TERMS)}")
        try:
            valid = math.isfinite(float(value)) and float(value) >= 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"loss weight {name}={value!r} must be a finite number >= 0")
    checked = {name: float(weights[name]) for name in TERMS if float(weights.get(name, 0.0)) > 0}
    if not checked:
        raise UserError(f"{what} has no term left with a weight > 0")
    return checked


def parse_weight_overrides(items: Iterable[str] | None) -> dict[str, float]:
    """Parse CLI strings like ``["fd=1000", "vrd=0.5"]`` into ``{"fd": 1000.0, "vrd": 0.5}``."""
    overrides: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UserError(f"loss weight {item!r} is not of the form TERM=NUMBER (e.g. fd=1000)")
        if name not in TERMS:
            raise UserError(f"unknown loss term {name!r}; valid terms: {', '.join(TERMS)}")
        try:
            overrides[name] = float(value)
        except ValueError:
            raise UserError(f"loss weight {item!r}: {value.strip()!r} is not a number") from None
    return overrides


# ---------------------------------------------------------------------------------------
# The module


class DistillLoss(nn.Module):
    """Weighted sum of CLIP-RD terms with the loss's own learnable parts.

    Args:
        weights: term name -> weight, e.g. ``weights_for("cliprd", {"fd": 1000})``; terms
            with weight 0 are dropped and never computed.
        student_dim, teacher_dim: embedding sizes. When they differ and a term compares
            student with teacher vectors (fd, icl, vrd, xrd), the module creates one
            ``Linear(student_dim -> teacher_dim)`` head per modality; P = normalize(head(S)).
            The heads are trained with the loss and are not part of the exported student.
        scale_param: how a_I, a_T, a_X are parameterised.
            ``"raw"`` (default, the reference recipe): the stored parameter is the
            multiplier itself, initialised to ln(1/0.07) = 2.659 and used as is (no exp, no
            clamp), so the initial multiplier is 2.659.
            ``"exp"``: mirrors CLIP's ``logit_scale``: the parameter is initialised to
            ln(1/0.07) and the multiplier is exp(param) clamped to <= 100, so the initial
            multiplier is 1/0.07 = 14.29.

    Only the parameters that the active terms use exist (a_I, a_T for vrd; a_X for icl or
    xrd; heads only for P-terms with unequal dims), so DDP never sees an unused parameter
    and a checkpoint holds exactly what the preset trains.

    Optimizer: put ``loss.parameters()`` in their own group(s); `param_groups` splits them
    into the heads' weight matrices (weight decay like the student's matrices) and the
    biases and scales (no weight decay: decaying a temperature towards 0 would flatten
    the distributions it sharpens).

    Forward contract: ``forward(t_img, t_txt, s_img, s_txt, s_logit_scale, t_scale)`` takes
    the *global* batch (under torchrun, pass the outputs of `rdkd.distributed.gather_batch`):
    teacher and student embeddings L2-normalised, ``s_logit_scale`` the student's
    ``logit_scale`` parameter in log space (open_clip's ``model.logit_scale``; the module
    uses s = exp(s_logit_scale) clamped to <= 100) and ``t_scale`` the teacher's multiplier
    tau = exp(teacher logit_scale) (e.g. 100.0). Returns ``(total, components)`` where
    ``components`` maps each active term name to its weighted value, a detached 0-dim
    tensor (call ``.item()`` when logging). Half-precision inputs are computed in float32,
    with autocast off: the softmaxes over a 1024-wide batch need the range.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        scale_param: str = "raw",
    ):
        super().__init__()
        if scale_param not in ("raw", "exp"):
            raise UserError(f"unknown scale_param {scale_param!r}; valid: raw, exp")
        self.weights = _checked_weights(weights)
        self.scale_param = scale_param
        active = [TERMS[name] for name in self.weights]

        self.needs_projection = any(t.uses_projection for t in active)
        if self.needs_projection and student_dim and teacher_dim and student_dim != teacher_dim:
            self.head_img = nn.Linear(student_dim, teacher_dim)
            self.head_txt = nn.Linear(student_dim, teacher_dim)
        else:
            self.head_img = self.head_txt = None

        used = {s for t in active for s in t.scales}
        # "raw" and "exp" share the init value ln(1/0.07); they differ in how it is used.
        self.scale_img = nn.Parameter(torch.tensor(INIT_SCALE)) if "img" in used else None
        self.scale_txt = nn.Parameter(torch.tensor(INIT_SCALE)) if "txt" in used else None
        self.scale_cross = nn.Parameter(torch.tensor(INIT_SCALE)) if "cross" in used else None

    @classmethod
    def from_preset(
        cls,
        preset: str,
        overrides: Mapping[str, float] | None = None,
        *,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        scale_param: str = "raw",
    ) -> "DistillLoss":
        return cls(weights_for(preset, overrides), student_dim, teacher_dim, scale_param)

    @property
    def needs_teacher(self) -> bool:
        """False when no active term reads teacher embeddings (preset ``clip``)."""
        return any(TERMS[name].uses_teacher for name in self.weights)

    def _effective(self, param: nn.Parameter | None) -> torch.Tensor | None:
        if param is None:
            return None
        return param.exp().clamp(max=MAX_SCALE) if self.scale_param == "exp" else param

    def scales(self) -> dict[str, torch.Tensor]:
        """The loss's own multipliers as used now (a_I, a_T, a_X), detached 0-dim tensors
        for logging (read them at a log point: reading is a host-device synchronisation)."""
        named = {"a_img": self.scale_img, "a_txt": self.scale_txt, "a_cross": self.scale_cross}
        return {k: self._effective(p).detach() for k, p in named.items() if p is not None}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the loss's parameters: head matrices decayed, the rest not."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
        return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])

    def project(self, s_img: torch.Tensor, s_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P_I, P_T: the student embeddings as compared with teacher vectors."""
        if self.head_img is None:
            return s_img, s_txt
        return F.normalize(self.head_img(s_img), dim=-1), F.normalize(self.head_txt(s_txt), dim=-1)

    def forward(
        self,
        t_img: torch.Tensor | None,
        t_txt: torch.Tensor | None,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_scale: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.needs_teacher and (t_img is None or t_txt is None):
            raise ValueError(f"loss terms {list(self.weights)} need teacher embeddings")
        if t_scale is None and any(n in self.weights for n in ("crd", "soft_target", "affinity")):
            raise ValueError("crd / soft_target / affinity need the teacher's scale t_scale")
        with torch.autocast(device_type=s_img.device.type, enabled=False):
            s_img, s_txt, t_img, t_txt = (_at_least_float32(x) for x in (s_img, s_txt, t_img, t_txt))
            p_img, p_txt = self.project(s_img, s_txt) if self.needs_projection else (None, None)
            self._check_shapes(t_img, t_txt, s_img, s_txt, p_img)
            rel = Relations(t_img, t_txt, s_img, s_txt, p_img, p_txt)
            log_s = torch.as_tensor(s_logit_scale, device=s_img.device).to(s_img.dtype)
            scales = Scales(
                student=log_s.exp().clamp(max=MAX_SCALE),
                teacher=t_scale,
                img=self._effective(self.scale_img),
                txt=self._effective(self.scale_txt),
                cross=self._effective(self.scale_cross),
            )
            total = s_img.new_zeros(())
            components: dict[str, torch.Tensor] = {}
            for name, weight in self.weights.items():
                value = weight * TERMS[name].compute(rel, scales)
                components[name] = value.detach()
                total = total + value
        return total, components

    def _check_shapes(self, t_img, t_txt, s_img, s_txt, p_img) -> None:
        rows = {tuple(x.shape[:1]) for x in (t_img, t_txt, s_img, s_txt) if x is not None}
        if len(rows) > 1 or s_img.ndim != 2 or s_txt.shape != s_img.shape:
            raise ValueError(
                "the loss needs [N, d] embeddings with one row per pair on every side; got "
                + ", ".join(f"{n} {tuple(x.shape)}" for n, x in
                            (("t_img", t_img), ("t_txt", t_txt), ("s_img", s_img), ("s_txt", s_txt))
                            if x is not None))
        if p_img is not None and t_img is not None and p_img.shape[1] != t_img.shape[1]:
            raise ValueError(
                f"student dim {p_img.shape[1]} != teacher dim {t_img.shape[1]}: build the loss "
                f"with student_dim and teacher_dim so it creates projection heads")

    def extra_repr(self) -> str:
        terms = ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
        return f"terms=({terms}), scale_param={self.scale_param}"


def _at_least_float32(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is not None and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x
