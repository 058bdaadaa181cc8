"""The CLIP-RD loss family: one pure function per term, the `DistillLoss` module and presets.

Notation and formulas follow the paper brief (shared/paper/CLIP-RD.md):

- ``S_I, S_T``: student image / text embeddings, L2-normalised (student space, dim d_s).
- ``T_I^k, T_T^k``: teacher k's embeddings, L2-normalised, frozen (dim d_k). With one
  teacher the index is dropped.
- ``P_I^k, P_T^k``: the student embeddings as compared with teacher k's vectors: ``S``
  itself when d_s == d_k, otherwise ``normalize(head_k(S))`` with one ``Linear(d_s -> d_k)``
  head per modality and teacher (normalised *after* the head).
- ``s``: the student's scale; ``tau_k``: teacher k's (its cache's logit scale); ``a_I^k,
  a_T^k, a_X^k``: the loss's learnable scales for teacher k.
- ``w_k``: teacher weights, >= 0, normalised to sum 1 (equal by default).
- ``CE(L)``: row-wise cross-entropy of logits ``L`` against the diagonal.
- ``KL(log p -> B)``: ``sum_j p_j (log p_j - log q_j)`` with ``q = softmax(B)``, averaged
  over rows, temperature 1; the target p is always detached.

One teacher (the paper's terms):

    task = 1/2 [CE(s S_I S_T^T) + CE(s S_T S_I^T)]
    CRD  = 1/2 [KL(tau T_I T_T^T -> s S_I S_T^T) + KL(tau T_T T_I^T -> s S_T S_I^T)]
    FD   = MSE(P_I, T_I) + MSE(P_T, T_T)
    ICL  = 1/2 [CE(a_X P_I T_T^T) + CE(a_X P_T T_I^T)]
    VRD  = 1/2 [KL(M_T -> M_I) + KL(M_T^T -> M_I^T)] + 1/2 [CE(M_I) + CE(M_I^T)]
           + 1/2 [CE(M_T) + CE(M_T^T)],   M_I = a_I T_I P_I^T, M_T = a_T T_T P_T^T
    XRD  = 1/4 [KL(B -> A) + KL(A -> B) + KL(B^T -> A^T) + KL(A^T -> B^T)],
           A = a_X T_I P_T^T, B = a_X T_T P_I^T
    soft_target = 1/2 [softCE(tau T_I T_T^T -> s S_I S_T^T) + the same transposed]

An ensemble of K teachers (MobileCLIP's choice: the targets are the teachers' averaged
probability distributions, each teacher at its own temperature). Every KL has a target side
and an input side. The target becomes the mixture of the teachers' target distributions,

    log p_bar(L_1..L_K) = log sum_k w_k softmax(L_k) = logsumexp_k(log w_k + log_softmax(L_k)),

computed in log space so no log of a rounded-off probability is taken; a transposed
direction mixes the transposed target logits. The input side is teacher k's own
student-side matrix where it depends on the teacher, and those KLs are weight-averaged:

    CRD  = 1/2 [KL(p_bar(tau_k T_I^k T_T^k^T) -> s S_I S_T^T) + transposed]
           (the input does not depend on k: one KL per direction)
    soft_target = 1/2 [softCE(sum_k w_k softmax(tau_k T_I^k T_T^k^T) -> s S_I S_T^T) + transposed]
    VRD  = 1/2 [sum_k w_k KL(p_bar(M_T^k) -> M_I^k) + sum_k w_k KL(p_bar(M_T^k^T) -> M_I^k^T)]
           + sum_k w_k (1/2 [CE(M_I^k) + CE(M_I^k^T)] + 1/2 [CE(M_T^k) + CE(M_T^k^T)]),
           M_I^k = a_I^k T_I^k P_I^k^T, M_T^k = a_T^k T_T^k P_T^k^T
    XRD  = 1/4 [sum_k w_k KL(p_bar(B_k) -> A_k) + sum_k w_k KL(p_bar(A_k) -> B_k)
                + the same two transposed],   A_k = a_X^k T_I^k P_T^k^T, B_k = a_X^k T_T^k P_I^k^T
    ICL  = sum_k w_k ICL_k (its target is the diagonal, not a teacher distribution, so there
           is nothing to mix: each teacher's ICL with its own a_X^k, weight-averaged)
    FD   = sum_k w_k FD_k with P^k from teacher k's own heads. Teachers have their own widths,
           so the projection heads are per teacher anyway and FD needs no refusal for mixed
           widths; a teacher as wide as the student has no head (as with one teacher), and
           FD then pulls S towards the w-weighted mean of those teachers' features.

With one teacher every formula is the single-teacher one, and it is computed exactly as
before the ensemble existed (the mixture of one is its log_softmax, no logsumexp; a mean
over one teacher multiplies by 1.0): one teacher gives bit-identical values and gradients.

Every pure term function takes L2-normalised tensors (teacher arguments first, then
student) and scales that are plain multipliers (already exponentiated where that applies),
and returns a scalar tensor. A teacher-side argument is one tensor (one teacher) or a
sequence of tensors, one per teacher; in ``fd``, ``icl``, ``vrd`` and ``xrd`` the ``s_*``
arguments are ``P`` and so also one per teacher, in ``clip_task``, ``crd``,
``soft_target_kd`` and ``affinity_mimic`` they are ``S``, one tensor. A scale argument is
one value (shared by all teachers) or one per teacher. ``teacher_weights`` (keyword) are
the w_k before normalisation; None means equal.

The terms share their similarity matrices. `Relations` holds one step: the student's own
matrix and one `TeacherView` per teacher, each computing its matrices once, on first use;
the term functions are written against it. The public functions wrap their arguments in a
fresh `Relations`, `DistillLoss` builds one per step and feeds every active term from it,
so the reference API and the training path are the same code.
"""

from __future__ import annotations


import math
import operator
from dataclasses import dataclass
from functools import cached_property, reduce
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rdkd.errors import UserError

__all__ = [
    "clip_task", "crd", "fd", "icl", "vrd", "xrd", "soft_target_kd", "affinity_mimic",
    "Relations", "TeacherView", "TeacherLink", "DistillLoss", "TERMS", "PRESETS", "weights_for",
    "parse_weight_overrides", "normalized_teacher_weights", "INIT_SCALE", "MAX_SCALE",
]

# ln(1/0.07): CLIP's initial logit scale, also the init of a_I, a_T, a_X in the reference recipe.
INIT_SCALE = math.log(1 / 0.07)
# CLIP's cap on exp(logit_scale).
MAX_SCALE = 100.0

Tensor = torch.Tensor
# A multiplier of similarities: a Python number or a 0-dim tensor (learnable or not).
Scale = torch.Tensor | float
# A teacher-side argument: one tensor (one teacher) or one tensor per teacher.
PerTeacher = torch.Tensor | Sequence[torch.Tensor]
# A scale argument: one value for every teacher, or one per teacher.
PerTeacherScale = Scale | Sequence[Scale]


# ---------------------------------------------------------------------------------------
# Building blocks


def _diagonal_ce(logits: torch.Tensor) -> torch.Tensor:
    """CE(L): row i's target class is column i; mean over rows."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def _symmetric_ce(logits: torch.Tensor) -> torch.Tensor:
    """1/2 [CE(L) + CE(L^T)]."""
    return 0.5 * (_diagonal_ce(logits) + _diagonal_ce(logits.T))


def _kl(log_p: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """KL(p -> input), batchmean, temperature 1; ``log_p`` is the (detached) target's
    row-wise log-probabilities, from `Relations.mixture`.

    Both sides enter as log-probabilities, so no log of a rounded-off probability is ever
    taken; a target probability that underflows to 0 contributes
    exp(log p) * (log p - log q) = 0 * finite = 0, the limit of p log p.
    """
    log_q = F.log_softmax(input_logits, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _soft_ce(p: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy -sum_j p_j log q_j, mean over rows; ``p`` the (detached) target."""
    return -(p * F.log_softmax(input_logits, dim=1)).sum(dim=1).mean()


def _transposed(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [m.T for m in matrices]


def normalized_teacher_weights(weights: Sequence[float] | None, count: int) -> tuple[float, ...]:
    """The teacher weights w_k for ``count`` teachers, normalised to sum 1 (None: equal).

    Raises `UserError` for a wrong count, a negative or non-finite weight, or all zeros.
    One teacher always gets exactly 1.0 (w / w), whatever its weight.
    """
    if weights is None:
        return (1.0 / count,) * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(f"{len(weights)} teacher weights given for {count} teachers")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"teacher weights {weights} must be finite, >= 0 and not all 0")
    total = sum(weights)
    return tuple(w / total for w in weights)


class TeacherView:
    """One teacher beside the student in one step: its embeddings T, the student's vectors
    in its space P, its scales, and their similarity matrices, each computed at most once.

    ``tau`` is the teacher's own multiplier, ``a_img``/``a_txt``/``a_cross`` the loss's
    a_I, a_T, a_X for this teacher. What no evaluated term needs may be left out.
    """

    def __init__(
        self,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        p_img: torch.Tensor | None = None,
        p_txt: torch.Tensor | None = None,
        tau: Scale | None = None,
        a_img: Scale | None = None,
        a_txt: Scale | None = None,
        a_cross: Scale | None = None,
    ):
        self.t_img, self.t_txt = t_img, t_txt
        self.p_img, self.p_txt = p_img, p_txt
        self.tau, self.a_img, self.a_txt, self.a_cross = tau, a_img, a_txt, a_cross

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


class Relations:
    """One step: the student's embeddings S and scale s, and one `TeacherView` per teacher
    with its (normalised) weight. ``s_img``/``s_txt`` may be left out when no term that
    reads S is evaluated.
    """

    def __init__(
        self,
        s_img: torch.Tensor | None,
        s_txt: torch.Tensor | None,
        s_scale: Scale | None,
        teachers: Sequence[TeacherView] = (),
        weights: Sequence[float] = (),
    ):
        if len(weights) != len(teachers):
            raise ValueError(f"{len(weights)} teacher weights for {len(teachers)} teachers")
        self.s_img, self.s_txt, self.s = s_img, s_txt, s_scale
        self.teachers, self.weights = tuple(teachers), tuple(weights)

    @cached_property
    def student(self) -> torch.Tensor:
        """S_I S_T^T."""
        return self.s_img @ self.s_txt.T

    def mixture(self, logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """log p_bar: the row-wise log of sum_k w_k softmax(L_k), detached (a KL target).

        One teacher is its log_softmax as is, so one teacher is bitwise the single-teacher
        loss; several are mixed by logsumexp in log space. A teacher of weight 0 is left out
        (its log-weight would be -inf).
        """
        if len(logits) == 1:
            return F.log_softmax(logits[0].detach(), dim=1)
        parts = [math.log(w) + F.log_softmax(x.detach(), dim=1)
                 for w, x in zip(self.weights, logits) if w > 0]
        return torch.logsumexp(torch.stack(parts), dim=0)

    def mean(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum_k w_k values_k (one teacher: 1.0 * value, exact)."""
        return reduce(operator.add, (w * v for w, v in zip(self.weights, values)))

    def mean_kl(self, log_p: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """sum_k w_k KL(p -> inputs_k): one target against each teacher's own input."""
        return self.mean([_kl(log_p, x) for x in inputs])


# ---------------------------------------------------------------------------------------
# The terms, written against shared Relations (formulas in the module docstring).


def _task(rel: Relations) -> torch.Tensor:
    return _symmetric_ce(rel.s * rel.student)


def _crd(rel: Relations) -> torch.Tensor:
    targets = [t.tau * t.teacher for t in rel.teachers]
    student = rel.s * rel.student
    return 0.5 * (_kl(rel.mixture(targets), student)
                  + _kl(rel.mixture(_transposed(targets)), student.T))


def _fd(rel: Relations) -> torch.Tensor:
    # each MSE a mean over all N x d_k elements of that teacher
    return rel.mean([F.mse_loss(t.p_img, t.t_img) + F.mse_loss(t.p_txt, t.t_txt)
                     for t in rel.teachers])


def _icl(rel: Relations) -> torch.Tensor:
    # P_I T_T^T = (T_T P_I^T)^T
    return rel.mean([
        0.5 * (_diagonal_ce(t.a_cross * t.teacher_text_student_image.T)
               + _diagonal_ce(t.a_cross * t.teacher_image_student_text.T))
        for t in rel.teachers
    ])


def _vrd(rel: Relations) -> torch.Tensor:
    m_img = [t.a_img * t.image for t in rel.teachers]
    m_txt = [t.a_txt * t.text for t in rel.teachers]
    # the text side is the (detached, mixed) target, in both normalisations
    kl = 0.5 * (rel.mean_kl(rel.mixture(m_txt), m_img)
                + rel.mean_kl(rel.mixture(_transposed(m_txt)), _transposed(m_img)))
    ce = rel.mean([_symmetric_ce(i) + _symmetric_ce(t) for i, t in zip(m_img, m_txt)])
    return kl + ce


def _xrd(rel: Relations) -> torch.Tensor:
    a = [t.a_cross * t.teacher_image_student_text for t in rel.teachers]
    b = [t.a_cross * t.teacher_text_student_image for t in rel.teachers]
    a_t, b_t = _transposed(a), _transposed(b)
    return 0.25 * (rel.mean_kl(rel.mixture(b), a) + rel.mean_kl(rel.mixture(a), b)
                   + rel.mean_kl(rel.mixture(b_t), a_t) + rel.mean_kl(rel.mixture(a_t), b_t))


def _soft_target(rel: Relations) -> torch.Tensor:
    # image->text and text->image soft cross-entropy against the teachers' mixed affinities;
    # no log of the target is taken, so it is mixed as probabilities
    targets = [t.tau * t.teacher for t in rel.teachers]
    student = rel.s * rel.student

    def mixed(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        return rel.mean([F.softmax(x.detach(), dim=1) for x in logits])

    return 0.5 * (_soft_ce(mixed(targets), student)
                  + _soft_ce(mixed(_transposed(targets)), student.T))


# ---------------------------------------------------------------------------------------
# The public reference API: one pure function per term.


def _per_teacher(value, count: int, name: str, *, one_for_all: bool) -> list:
    """One entry per teacher. A sequence must have one per teacher; a single tensor argument
    is one teacher's, a single scale (``one_for_all``) and None are every teacher's."""
    if value is None or isinstance(value, (torch.Tensor, float, int)):
        values = [value] * count if value is None or one_for_all else [value]
    else:
        values = list(value)
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} given for {count} teachers")
    return values


def _relations(
    t_img: PerTeacher,
    t_txt: PerTeacher,
    s_img: Tensor | None = None,
    s_txt: Tensor | None = None,
    s_scale: Scale | None = None,
    *,
    teacher_weights: Sequence[float] | None,
    **per_teacher,
) -> Relations:
    """A fresh `Relations` from the public functions' arguments; ``per_teacher`` holds the
    `TeacherView` arguments besides T (p_img, p_txt, tau, a_img, a_txt, a_cross)."""
    count = 1 if isinstance(t_img, torch.Tensor) else len(t_img)
    columns = {
        name: _per_teacher(value, count, name, one_for_all=name not in ("t_img", "t_txt", "p_img", "p_txt"))
        for name, value in {"t_img": t_img, "t_txt": t_txt, **per_teacher}.items()
    }
    views = [TeacherView(**{name: values[k] for name, values in columns.items()}) for k in range(count)]
    return Relations(s_img, s_txt, s_scale, views, normalized_teacher_weights(teacher_weights, count))


def clip_task(s_img: Tensor, s_txt: Tensor, s_scale: Scale) -> Tensor:
    """CLIP's contrastive task loss 1/2 [CE(s S_I S_T^T) + CE(s S_T S_I^T)]."""
    return _task(Relations(s_img, s_txt, s_scale))


def crd(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: Tensor, s_txt: Tensor, t_scale: PerTeacherScale,
    s_scale: Scale, *, teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """CLIP-KD's contrastive relational distillation (CRD, also "HRD"); ``s_*`` are S.

    1/2 [KL(tau T_I T_T^T -> s S_I S_T^T) + KL(tau T_T T_I^T -> s S_T S_I^T)], the teacher
    side the mixture of the teachers' distributions, each at its own tau_k.
    """
    return _crd(_relations(t_img, t_txt, s_img, s_txt, s_scale, tau=t_scale,
                           teacher_weights=teacher_weights))


def fd(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: PerTeacher, s_txt: PerTeacher, *,
    teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """Feature distillation sum_k w_k [MSE(P_I^k, T_I^k) + MSE(P_T^k, T_T^k)]; ``s_*`` are P."""
    return _fd(_relations(t_img, t_txt, p_img=s_img, p_txt=s_txt, teacher_weights=teacher_weights))


def icl(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: PerTeacher, s_txt: PerTeacher,
    scale_cross: PerTeacherScale, *, teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """Interactive contrastive learning 1/2 [CE(a_X P_I T_T^T) + CE(a_X P_T T_I^T)],
    weight-averaged over teachers; ``s_*`` are P."""
    return _icl(_relations(t_img, t_txt, p_img=s_img, p_txt=s_txt, a_cross=scale_cross,
                           teacher_weights=teacher_weights))


def vrd(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: PerTeacher, s_txt: PerTeacher,
    scale_img: PerTeacherScale, scale_txt: PerTeacherScale, *,
    teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """Vertical relational distillation: the KL part plus both intra-modal CE parts.

    With M_I = a_I T_I P_I^T and M_T = a_T T_T P_T^T (``s_*`` are P):
    1/2 [KL(M_T -> M_I) + KL(M_T^T -> M_I^T)] + 1/2 [CE(M_I) + CE(M_I^T)] + 1/2 [CE(M_T) + CE(M_T^T)];
    an ensemble mixes the M_T targets and weight-averages the rest (module docstring).
    """
    return _vrd(_relations(t_img, t_txt, p_img=s_img, p_txt=s_txt, a_img=scale_img,
                           a_txt=scale_txt, teacher_weights=teacher_weights))


def xrd(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: PerTeacher, s_txt: PerTeacher,
    scale_cross: PerTeacherScale, *, teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """Cross relational distillation, a symmetric KL between A = a_X T_I P_T^T and B = a_X T_T P_I^T.

    1/4 [KL(B -> A) + KL(A -> B) + KL(B^T -> A^T) + KL(A^T -> B^T)]; ``s_*`` are P; an
    ensemble mixes each target and weight-averages the KLs (module docstring).
    """
    return _xrd(_relations(t_img, t_txt, p_img=s_img, p_txt=s_txt, a_cross=scale_cross,
                           teacher_weights=teacher_weights))


def soft_target_kd(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: Tensor, s_txt: Tensor, t_scale: PerTeacherScale,
    s_scale: Scale, *, teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """open_clip's ``DistillClipLoss`` distillation part.

    1/2 [softCE(tau T_I T_T^T -> s S_I S_T^T) + softCE(tau T_T T_I^T -> s S_T S_I^T)] with
    softCE(A -> B) = -mean_i sum_j softmax(A)_ij log softmax(B)_ij; ``s_*`` are S; an
    ensemble's target is sum_k w_k softmax(tau_k T_I^k T_T^k^T). It differs from `crd` by
    the target's entropy only, a constant: same gradients, different value.
    """
    return _soft_target(_relations(t_img, t_txt, s_img, s_txt, s_scale, tau=t_scale,
                                   teacher_weights=teacher_weights))


def affinity_mimic(
    t_img: PerTeacher, t_txt: PerTeacher, s_img: Tensor, s_txt: Tensor, t_scale: PerTeacherScale,
    s_scale: Scale, *, teacher_weights: Sequence[float] | None = None,
) -> Tensor:
    """TinyCLIP's affinity mimicking (Wu et al., ICCV 2023).

    The student's image-to-text and text-to-image affinity distributions (row softmaxes of
    s S_I S_T^T and its transpose) are matched to the teacher's (tau T_I T_T^T) by
    cross-entropy, the two directions averaged. As published this is the same formula as
    open_clip's soft-target loss, so it is computed by it; what sets the TinyCLIP baseline
    apart is its preset (`tinyclip`: no task loss, as TinyCLIP's default distillation_alpha=1).
    """
    return soft_target_kd(t_img, t_txt, s_img, s_txt, t_scale, s_scale, teacher_weights=teacher_weights)


# ---------------------------------------------------------------------------------------
# Terms, presets and weights


@dataclass(frozen=True)
class Term:
    name: str
    compute: Callable[[Relations], torch.Tensor]
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


class TeacherLink(nn.Module):
    """The loss's learnable parts for one teacher: the heads into its space and its scales.

    ``head_img``/``head_txt`` (``Linear(student_dim -> teacher_dim)``) exist only when a
    P-term is active and the widths differ; ``scale_img``/``scale_txt``/``scale_cross``
    (a_I, a_T, a_X) only when an active term uses them. The registration order (heads, then
    scales) is the single-teacher loss's, so one teacher draws the same head init from the
    global RNG and hands the optimizer its parameters in the same order as before.
    """

    def __init__(self, student_dim: int | None, teacher_dim: int | None, projects: bool,
                 scales: Iterable[str]):
        super().__init__()
        if projects and student_dim and teacher_dim and student_dim != teacher_dim:
            self.head_img = nn.Linear(student_dim, teacher_dim)
            self.head_txt = nn.Linear(student_dim, teacher_dim)
        else:
            self.head_img = self.head_txt = None
        scales = set(scales)
        # "raw" and "exp" share the init value ln(1/0.07); they differ in how it is used.
        self.scale_img = nn.Parameter(torch.tensor(INIT_SCALE)) if "img" in scales else None
        self.scale_txt = nn.Parameter(torch.tensor(INIT_SCALE)) if "txt" in scales else None
        self.scale_cross = nn.Parameter(torch.tensor(INIT_SCALE)) if "cross" in scales else None

    def project(self, s_img: torch.Tensor, s_txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P_I, P_T: the student embeddings as compared with this teacher's vectors."""
        if self.head_img is None:
            return s_img, s_txt
        return F.normalize(self.head_img(s_img), dim=-1), F.normalize(self.head_txt(s_txt), dim=-1)


# The state-dict names of a single-teacher loss written before ensembles existed (v0.2),
# when its parts sat on `DistillLoss` itself; they are teachers.0.* now.
_V02_KEYS = ("head_img.weight", "head_img.bias", "head_txt.weight", "head_txt.bias",
             "scale_img", "scale_txt", "scale_cross")


def _rename_v02_keys(module, state_dict, prefix, *_) -> None:
    """load_state_dict pre-hook: v0.2 checkpoints still resume (see `_V02_KEYS`)."""
    for key in _V02_KEYS:
        if prefix + key in state_dict:
            state_dict[f"{prefix}teachers.0.{key}"] = state_dict.pop(prefix + key)


class DistillLoss(nn.Module):
    """Weighted sum of CLIP-RD terms with the loss's own learnable parts, for one teacher or
    an ensemble of teachers (formulas in the module docstring).

    Args:
        weights: term name -> weight, e.g. ``weights_for("cliprd", {"fd": 1000})``; terms
            with weight 0 are dropped and never computed.
        student_dim, teacher_dim: embedding sizes; ``teacher_dim`` one int (one teacher) or
            one per teacher (an ensemble, in the order of ``forward``'s teacher arguments).
            Each teacher gets its own `TeacherLink` in ``self.teachers``: when its width
            differs from the student's and a term compares student with teacher vectors
            (fd, icl, vrd, xrd), one ``Linear(student_dim -> teacher_dim)`` head per
            modality, P = normalize(head(S)); and its own a_I, a_T, a_X. The heads are
            trained with the loss and are not part of the exported student.
        scale_param: how a_I, a_T, a_X are parameterised.
            ``"raw"`` (default, the reference recipe): the stored parameter is the
            multiplier itself, initialised to ln(1/0.07) = 2.659 and used as is (no exp, no
            clamp), so the initial multiplier is 2.659.
            ``"exp"``: mirrors CLIP's ``logit_scale``: the parameter is initialised to
            ln(1/0.07) and the multiplier is exp(param) clamped to <= 100, so the initial
            multiplier is 1/0.07 = 14.29.
        teacher_weights: the ensemble's w_k, one per teacher, normalised to sum 1; None is
            equal weights. `UserError` for a negative, non-finite or all-zero set.

    Only the parameters that the active terms use exist (a_I, a_T for vrd; a_X for icl or
    xrd; heads only for P-terms with unequal dims), so DDP never sees an unused parameter
    and a checkpoint holds exactly what the preset trains. A v0.2 checkpoint's single-teacher
    names (``head_img.weight``, ``scale_img``, ...) load into ``teachers.0``.

    Optimizer: put ``loss.parameters()`` in their own group(s); `param_groups` splits them
    into the heads' weight matrices (weight decay like the student's matrices) and the
    biases and scales (no weight decay: decaying a temperature towards 0 would flatten
    the distributions it sharpens).

    Forward contract: ``forward(t_img, t_txt, s_img, s_txt, s_logit_scale, t_scale)`` takes
    the *global* batch (under torchrun, pass the outputs of `rdkd.distributed.gather_batch`):
    teacher and student embeddings L2-normalised, ``t_img``/``t_txt`` one tensor per teacher
    (``[N, d_k]``; a bare tensor with one teacher), ``s_logit_scale`` the student's
    ``logit_scale`` parameter in log space (open_clip's ``model.logit_scale``; the module
    uses s = exp(s_logit_scale) clamped to <= 100) and ``t_scale`` the teachers' multipliers
    tau_k = exp(teacher logit_scale) (e.g. 100.0), one value for all or one per teacher.
    Returns ``(total, components)`` where ``components`` maps each active term name to its
    weighted value (the ensemble's), a detached 0-dim tensor (call ``.item()`` when
    logging). Half-precision inputs are computed in float32, with autocast off: the
    softmaxes over a 1024-wide batch need the range.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        student_dim: int | None = None,
        teacher_dim: int | Sequence[int] | None = None,
        scale_param: str = "raw",
        teacher_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if scale_param not in ("raw", "exp"):
            raise UserError(f"unknown scale_param {scale_param!r}; valid: raw, exp")
        self.weights = _checked_weights(weights)
        self.scale_param = scale_param
        teacher_dims = list(teacher_dim) if isinstance(teacher_dim, Sequence) else [teacher_dim]
        if not teacher_dims:
            raise UserError("the loss needs at least one teacher (teacher_dim is empty)")
        self.teacher_weights = normalized_teacher_weights(teacher_weights, len(teacher_dims))
        active = [TERMS[name] for name in self.weights]
        self.needs_projection = any(t.uses_projection for t in active)
        used = {s for t in active for s in t.scales}
        self.teachers = nn.ModuleList(
            TeacherLink(student_dim, dim, self.needs_projection, used) for dim in teacher_dims)
        self.register_load_state_dict_pre_hook(_rename_v02_keys)

    @classmethod
    def from_preset(
        cls,
        preset: str,
        overrides: Mapping[str, float] | None = None,
        *,
        student_dim: int | None = None,
        teacher_dim: int | Sequence[int] | None = None,
        scale_param: str = "raw",
        teacher_weights: Sequence[float] | None = None,
    ) -> "DistillLoss":
        return cls(weights_for(preset, overrides), student_dim, teacher_dim, scale_param, teacher_weights)

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
        for logging (read them at a log point: reading is a host-device synchronisation).
        Keys ``a_img``, ``a_txt``, ``a_cross``; with several teachers ``a_img/0``, ... ."""
        named = {}
        for k, link in enumerate(self.teachers):
            suffix = f"/{k}" if len(self.teachers) > 1 else ""
            for key, param in (("a_img", link.scale_img), ("a_txt", link.scale_txt),
                               ("a_cross", link.scale_cross)):
                if param is not None:
                    named[key + suffix] = self._effective(param).detach()
        return named

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups for the loss's parameters: head matrices decayed, the rest not."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
        return groups + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])

    def relations(
        self,
        t_img: PerTeacher | None,
        t_txt: PerTeacher | None,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_scale: PerTeacherScale | None = None,
    ) -> Relations:
        """One step's `Relations` (``forward``'s arguments): half precision made float32, P
        through each teacher's heads, the scales as in effect. No teacher views when no
        active term reads a teacher."""
        s_img, s_txt = _at_least_float32(s_img), _at_least_float32(s_txt)
        log_s = torch.as_tensor(s_logit_scale, device=s_img.device).to(s_img.dtype)
        views = []
        if self.needs_teacher:
            count = len(self.teachers)
            columns = zip(self.teachers, _per_teacher(t_img, count, "t_img", one_for_all=False),
                          _per_teacher(t_txt, count, "t_txt", one_for_all=False),
                          _per_teacher(t_scale, count, "t_scale", one_for_all=True))
            for link, t_img_k, t_txt_k, tau in columns:
                p_img, p_txt = link.project(s_img, s_txt) if self.needs_projection else (None, None)
                views.append(TeacherView(
                    _at_least_float32(t_img_k), _at_least_float32(t_txt_k), p_img, p_txt, tau,
                    self._effective(link.scale_img), self._effective(link.scale_txt),
                    self._effective(link.scale_cross)))
        return Relations(s_img, s_txt, log_s.exp().clamp(max=MAX_SCALE), views,
                         self.teacher_weights if views else ())

    def forward(
        self,
        t_img: PerTeacher | None,
        t_txt: PerTeacher | None,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_scale: PerTeacherScale | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.needs_teacher and (t_img is None or t_txt is None):
            raise ValueError(f"loss terms {list(self.weights)} need teacher embeddings")
        if t_scale is None and any(n in self.weights for n in ("crd", "soft_target", "affinity")):
            raise ValueError("crd / soft_target / affinity need the teacher's scale t_scale")
        with torch.autocast(device_type=s_img.device.type, enabled=False):
            rel = self.relations(t_img, t_txt, s_img, s_txt, s_logit_scale, t_scale)
            _check_shapes(rel)
            total = rel.s_img.new_zeros(())
            components: dict[str, torch.Tensor] = {}
            for name, weight in self.weights.items():
                value = weight * TERMS[name].compute(rel)
                components[name] = value.detach()
                total = total + value
        return total, components

    def extra_repr(self) -> str:
        terms = ", ".join(f"{k}={v:g}" for k, v in self.weights.items())
        ensemble = (f", teacher_weights=({', '.join(f'{w:g}' for w in self.teacher_weights)})"
                    if len(self.teachers) > 1 else "")
        return f"terms=({terms}), scale_param={self.scale_param}{ensemble}"


def _check_shapes(rel: Relations) -> None:
    sides = [("s_img", rel.s_img), ("s_txt", rel.s_txt)] + [
        (f"{name}[{k}]", x) for k, t in enumerate(rel.teachers)
        for name, x in (("t_img", t.t_img), ("t_txt", t.t_txt))]
    if (len({x.shape[0] for _, x in sides}) > 1 or rel.s_img.ndim != 2
            or rel.s_txt.shape != rel.s_img.shape):
        raise ValueError("the loss needs [N, d] embeddings with one row per pair on every side; got "
                         + ", ".join(f"{name} {tuple(x.shape)}" for name, x in sides))
    for k, t in enumerate(rel.teachers):
        if t.p_img is not None and t.p_img.shape[1] != t.t_img.shape[1]:
            raise ValueError(
                f"student dim {t.p_img.shape[1]} != teacher {k}'s dim {t.t_img.shape[1]}: build "
                f"the loss with student_dim and teacher_dim so it creates projection heads")


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x
