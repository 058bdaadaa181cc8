"""Known-answer tests for rdkd.losses against a plain float64 re-derivation of the brief.

The reference below is written from shared/paper/CLIP-RD.md with explicit loops and sums;
it calls nothing from rdkd.losses. Values and gradients (w.r.t. the student tensors and
the scales) must agree to 1e-6.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdkd import losses
from rdkd.errors import UserError

torch.set_num_threads(1)
TOL = dict(rtol=1e-6, atol=1e-6)
N, D = 5, 7


# ---------------------------------------------------------------------------------------
# The independent reference


def ref_log_softmax_row(row: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(float(v.detach()) for v in row)
    log_z = top + torch.log(sum(torch.exp(v - top) for v in row))
    return [v - log_z for v in row]


def ref_rows(m: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[m[i, j] for j in range(m.shape[1])] for i in range(m.shape[0])]


def ref_ce(m: torch.Tensor) -> torch.Tensor:
    """Row i's label is i; mean over rows."""
    rows = ref_rows(m)
    return sum(-ref_log_softmax_row(row)[i] for i, row in enumerate(rows)) / len(rows)


def ref_kl(target: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j), mean over rows, the target detached."""
    total = 0.0
    for t_row, i_row in zip(ref_rows(target.detach()), ref_rows(inp)):
        log_p, log_q = ref_log_softmax_row(t_row), ref_log_softmax_row(i_row)
        total = total + sum(torch.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q))
    return total / target.shape[0]


def ref_soft_ce(target: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for t_row, i_row in zip(ref_rows(target.detach()), ref_rows(inp)):
        log_p, log_q = ref_log_softmax_row(t_row), ref_log_softmax_row(i_row)
        total = total - sum(torch.exp(lp) * lq for lp, lq in zip(log_p, log_q))
    return total / target.shape[0]


def ref_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum() / a.numel()


def ref_task(si, st, s):
    return 0.5 * (ref_ce(s * si @ st.T) + ref_ce(s * st @ si.T))


def ref_crd(ti, tt, si, st, tau, s):
    return 0.5 * (ref_kl(tau * ti @ tt.T, s * si @ st.T) + ref_kl(tau * tt @ ti.T, s * st @ si.T))


def ref_fd(ti, tt, pi, pt):
    return ref_mse(pi, ti) + ref_mse(pt, tt)


def ref_icl(ti, tt, pi, pt, ax):
    return 0.5 * (ref_ce(ax * pi @ tt.T) + ref_ce(ax * pt @ ti.T))


def ref_vrd_kl(ti, tt, pi, pt, ai, at):
    m_i, m_t = ai * ti @ pi.T, at * tt @ pt.T
    return 0.5 * (ref_kl(m_t, m_i) + ref_kl(m_t.T, m_i.T))


def ref_vrd_ce(ti, tt, pi, pt, ai, at):
    m_i, m_t = ai * ti @ pi.T, at * tt @ pt.T
    return 0.5 * (ref_ce(m_i) + ref_ce(m_i.T)) + 0.5 * (ref_ce(m_t) + ref_ce(m_t.T))


def ref_vrd(ti, tt, pi, pt, ai, at):
    return ref_vrd_kl(ti, tt, pi, pt, ai, at) + ref_vrd_ce(ti, tt, pi, pt, ai, at)


def ref_xrd(ti, tt, pi, pt, ax):
    a, b = ax * ti @ pt.T, ax * tt @ pi.T
    return 0.25 * (ref_kl(b, a) + ref_kl(a, b) + ref_kl(b.T, a.T) + ref_kl(a.T, b.T))


def ref_soft_target(ti, tt, si, st, tau, s):
    return 0.5 * (
        ref_soft_ce(tau * ti @ tt.T, s * si @ st.T) + ref_soft_ce(tau * tt @ ti.T, s * st @ si.T)
    )


# ---------------------------------------------------------------------------------------
# Fixtures


def unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def leaf(x):
    return x.clone().requires_grad_(True)


def scalar(v):
    return torch.tensor(v, dtype=torch.float64, requires_grad=True)


@pytest.fixture
def batch():
    """Teacher and student embeddings, student-side leaves requiring grad. The student
    image/text embeddings are correlated with the teacher's so the terms sit in a
    realistic range rather than at chance."""
    t_img, t_txt = unit(N, D, seed=1), unit(N, D, seed=2)
    s_img = F.normalize(t_img + 0.7 * unit(N, D, seed=3), dim=-1)
    s_txt = F.normalize(t_txt + 0.7 * unit(N, D, seed=4), dim=-1)
    return t_img, t_txt, leaf(s_img), leaf(s_txt)


def check(value, ref, wrt):
    """Values and gradients w.r.t. ``wrt`` agree to 1e-6."""
    torch.testing.assert_close(value, ref, **TOL)
    got = torch.autograd.grad(value, wrt, allow_unused=True)
    want = torch.autograd.grad(ref, wrt, allow_unused=True)
    for g, w in zip(got, want):
        g = torch.zeros(()) if g is None else g
        w = torch.zeros(()) if w is None else w
        torch.testing.assert_close(g.double().expand_as(w) if w.ndim else g.double(), w.double(), **TOL)


# ---------------------------------------------------------------------------------------
# Per-term known answers


def test_clip_task(batch):
    _, _, si, st = batch
    s = scalar(14.3)
    check(losses.clip_task(si, st, s), ref_task(si, st, s), (si, st, s))


def test_crd(batch):
    ti, tt, si, st = batch
    ti, tt, s, tau = leaf(ti), leaf(tt), scalar(11.0), scalar(100.0)
    value = losses.crd(ti, tt, si, st, tau, s)
    check(value, ref_crd(ti, tt, si, st, tau, s), (si, st, s))
    # the teacher side is a KL target: no gradient reaches it or its scale
    g_ti, g_tt, g_tau = torch.autograd.grad(value, (ti, tt, tau), allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in (g_ti, g_tt, g_tau))


def test_fd(batch):
    ti, tt, pi, pt = batch
    check(losses.fd(ti, tt, pi, pt), ref_fd(ti, tt, pi, pt), (pi, pt))


def test_icl(batch):
    ti, tt, pi, pt = batch
    ax = scalar(2.659)
    check(losses.icl(ti, tt, pi, pt, ax), ref_icl(ti, tt, pi, pt, ax), (pi, pt, ax))


def test_vrd(batch):
    ti, tt, pi, pt = batch
    ai, at = scalar(2.659), scalar(3.1)
    value = losses.vrd(ti, tt, pi, pt, ai, at)
    check(value, ref_vrd(ti, tt, pi, pt, ai, at), (pi, pt, ai, at))


def test_vrd_text_side_is_a_detached_target(batch):
    """Through the KL part no gradient reaches P_T or a_T: their gradient is the CE part's."""
    ti, tt, pi, pt = batch
    ai, at = scalar(2.659), scalar(3.1)
    got = torch.autograd.grad(losses.vrd(ti, tt, pi, pt, ai, at), (pt, at))
    want = torch.autograd.grad(ref_vrd_ce(ti, tt, pi, pt, ai, at), (pt, at))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    # and the KL part of vrd does move P_I (a vrd without its KL would pass the check above):
    # the product's P_I gradient is the CE part's plus the KL part's, and the latter is not small
    got_pi = torch.autograd.grad(losses.vrd(ti, tt, pi, pt, ai, at), pi)[0]
    ce_pi = torch.autograd.grad(ref_vrd_ce(ti, tt, pi, pt, ai, at), pi)[0]
    kl_pi = torch.autograd.grad(ref_vrd_kl(ti, tt, pi, pt, ai, at), pi)[0]
    torch.testing.assert_close(got_pi - ce_pi, kl_pi, **TOL)
    assert (got_pi - ce_pi).abs().max() > 1e-3


def test_xrd(batch):
    ti, tt, pi, pt = batch
    ax = scalar(2.659)
    check(losses.xrd(ti, tt, pi, pt, ax), ref_xrd(ti, tt, pi, pt, ax), (pi, pt, ax))


def test_xrd_differs_from_the_undetached_kl(batch):
    """Each direction's target is detached; letting gradient into the targets changes it."""
    ti, tt, pi, pt = batch
    ax = scalar(2.659)

    def kl_both_sides(target, inp):
        return (F.softmax(target, 1) * (F.log_softmax(target, 1) - F.log_softmax(inp, 1))).sum() / N

    a, b = ax * ti @ pt.T, ax * tt @ pi.T
    undetached = 0.25 * (kl_both_sides(b, a) + kl_both_sides(a, b)
                         + kl_both_sides(b.T, a.T) + kl_both_sides(a.T, b.T))
    got = torch.autograd.grad(losses.xrd(ti, tt, pi, pt, ax), pi)[0]
    wrong = torch.autograd.grad(undetached, pi)[0]
    assert (got - wrong).abs().max() > 1e-4


def test_soft_target_kd_and_affinity_mimic(batch):
    ti, tt, si, st = batch
    s, tau = scalar(9.0), 100.0
    ref = ref_soft_target(ti, tt, si, st, tau, s)
    check(losses.soft_target_kd(ti, tt, si, st, tau, s), ref, (si, st, s))
    check(losses.affinity_mimic(ti, tt, si, st, tau, s), ref_soft_target(ti, tt, si, st, tau, s),
          (si, st, s))


def test_clip_task_equals_open_clip_clip_loss(batch):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    _, _, si, st = batch
    s = torch.tensor(14.3, dtype=torch.float64)
    torch.testing.assert_close(losses.clip_task(si, st, s), open_clip_loss.ClipLoss()(si, st, s), **TOL)


def test_soft_target_equals_open_clip_distill_clip_loss(batch):
    open_clip_loss = pytest.importorskip("open_clip.loss")
    ti, tt, si, st = batch
    s, tau = torch.tensor(9.0, dtype=torch.float64), torch.tensor(100.0, dtype=torch.float64)
    _, distill = open_clip_loss.DistillClipLoss()(si, st, s, ti, tt, tau)
    torch.testing.assert_close(losses.soft_target_kd(ti, tt, si, st, tau, s), distill, **TOL)


# ---------------------------------------------------------------------------------------
# Numbers worked out by hand (N = 2)


def test_hand_computed_task_and_crd():
    eye = torch.eye(2, dtype=torch.float64)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # logits = I: each row's CE is -log(e / (e + 1)) = log(1 + 1/e)
    assert losses.clip_task(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    # teacher logits I (p = [e, 1]/(e+1)), student logits swap (q = [1, e]/(e+1)):
    # KL per row = p1 * log(e) + p2 * log(1/e) = (e - 1)/(e + 1) = tanh(1/2), in every direction
    assert losses.crd(eye, eye, eye, swap, 1.0, 1.0).item() == pytest.approx(math.tanh(0.5), abs=1e-12)
    # FD: I against swap differs by 1 in all four entries -> MSE 1 per modality, 2 in all
    assert losses.fd(eye, eye, swap, swap).item() == pytest.approx(2.0, abs=1e-12)


def test_kl_with_a_target_probability_that_underflows():
    """A teacher row with a probability of exactly 0 in float64 gives a finite KL and gradient."""
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = leaf(F.normalize(torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=torch.float64), dim=-1))
    # a_T = 2000: softmax of [2000, 0] underflows to [1, 0]
    value = losses.vrd(t, t, p, p.detach(), 1.0, 2000.0)
    (grad,) = torch.autograd.grad(value, p)
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------
# Presets, weights and overrides


def test_presets_compose_the_brief_table():
    clipkd = {"task": 1.0, "crd": 1.0, "fd": 2000.0, "icl": 1.0}
    assert losses.weights_for("clip") == {"task": 1.0}
    assert losses.weights_for("crd") == {"task": 1.0, "crd": 1.0}
    assert losses.weights_for("fd") == {"task": 1.0, "fd": 2000.0}
    assert losses.weights_for("icl") == {"task": 1.0, "icl": 1.0}
    assert losses.weights_for("clipkd") == clipkd
    assert losses.weights_for("vrd") == {**clipkd, "vrd": 1.0}
    assert losses.weights_for("xrd") == {**clipkd, "xrd": 1.0}
    assert losses.weights_for("cliprd") == {**clipkd, "vrd": 1.0, "xrd": 1.0}
    assert losses.weights_for("distill") == {"task": 1.0, "soft_target": 1.0}
    assert losses.weights_for("tinyclip") == {"affinity": 1.0}
    assert losses.weights_for("mobileclip") == {"task": 0.25, "crd": 0.75}


def test_overrides_change_add_and_remove_terms():
    w = losses.weights_for("cliprd", {"fd": 1000, "vrd": 0})
    assert w["fd"] == 1000.0 and "vrd" not in w and w["xrd"] == 1.0
    assert losses.weights_for("clip", {"xrd": 0.5}) == {"task": 1.0, "xrd": 0.5}
    assert losses.parse_weight_overrides(["fd=1000", " vrd = 0.5"]) == {"fd": 1000.0, "vrd": 0.5}
    assert losses.parse_weight_overrides(None) == {}


@pytest.mark.parametrize(
    "call, listed",
    [
        (lambda: losses.weights_for("clipr"), "cliprd"),
        (lambda: losses.weights_for("cliprd", {"fdd": 1}), "xrd"),
        (lambda: losses.parse_weight_overrides(["hrd=1"]), "crd"),
        (lambda: losses.parse_weight_overrides(["fd"]), "TERM=NUMBER"),
        (lambda: losses.parse_weight_overrides(["fd=lots"]), "not a number"),
        (lambda: losses.weights_for("cliprd", {"fd": -1}), ">= 0"),
        (lambda: losses.weights_for("cliprd", {"fd": float("nan")}), ">= 0"),
        (lambda: losses.weights_for("clip", {"task": 0}), "no term"),
        (lambda: losses.DistillLoss({"task": 1}, scale_param="log"), "raw, exp"),
    ],
)
def test_bad_names_and_weights_raise_one_line_user_errors(call, listed):
    with pytest.raises(UserError) as err:
        call()
    assert listed in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# The module


def module_inputs(d_s=D, d_t=D, seed=10):
    t_img, t_txt = unit(N, d_t, seed=seed), unit(N, d_t, seed=seed + 1)
    s_img, s_txt = leaf(unit(N, d_s, seed=seed + 2)), leaf(unit(N, d_s, seed=seed + 3))
    return t_img, t_txt, s_img, s_txt, scalar(math.log(12.0)), 100.0


def test_module_total_is_the_weighted_sum_of_the_pure_terms():
    loss = losses.DistillLoss.from_preset("cliprd", {"fd": 1000}).double()
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs()
    total, parts = loss(t_img, t_txt, s_img, s_txt, log_s, tau)
    assert list(parts) == ["task", "crd", "fd", "icl", "vrd", "xrd"]
    s = log_s.exp()
    a = loss.teachers[0].scale_img, loss.teachers[0].scale_txt, loss.teachers[0].scale_cross
    ref = {
        "task": ref_task(s_img, s_txt, s),
        "crd": ref_crd(t_img, t_txt, s_img, s_txt, tau, s),
        "fd": 1000 * ref_fd(t_img, t_txt, s_img, s_txt),
        "icl": ref_icl(t_img, t_txt, s_img, s_txt, a[2]),
        "vrd": ref_vrd(t_img, t_txt, s_img, s_txt, a[0], a[1]),
        "xrd": ref_xrd(t_img, t_txt, s_img, s_txt, a[2]),
    }
    for name, value in ref.items():
        torch.testing.assert_close(parts[name], value.detach(), **TOL)
        assert not parts[name].requires_grad
    check(total, sum(ref.values()), (s_img, s_txt, log_s, *a))


def test_unequal_dims_create_heads_and_normalise_after_them():
    loss = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D).double()
    link = loss.teachers[0]
    assert link.head_img.weight.shape == (D, 4) and link.head_txt is not link.head_img
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs(d_s=4)
    total, parts = loss(t_img, t_txt, s_img, s_txt, log_s, tau)
    p_img = F.normalize(s_img @ link.head_img.weight.T + link.head_img.bias, dim=-1)
    p_txt = F.normalize(s_txt @ link.head_txt.weight.T + link.head_txt.bias, dim=-1)
    s, (ai, at, ax) = log_s.exp(), (link.scale_img, link.scale_txt, link.scale_cross)
    ref = (
        ref_task(s_img, s_txt, s) + ref_crd(t_img, t_txt, s_img, s_txt, tau, s)  # S, not P
        + 2000 * ref_fd(t_img, t_txt, p_img, p_txt) + ref_icl(t_img, t_txt, p_img, p_txt, ax)
        + ref_vrd(t_img, t_txt, p_img, p_txt, ai, at) + ref_xrd(t_img, t_txt, p_img, p_txt, ax)
    )
    head_params = (link.head_img.weight, link.head_img.bias, link.head_txt.weight, link.head_txt.bias)
    check(total, ref, (s_img, s_txt, log_s, ai, at, ax, *head_params))


def test_equal_dims_or_student_only_terms_create_no_heads():
    assert losses.DistillLoss.from_preset("cliprd", student_dim=D, teacher_dim=D).teachers[0].head_img is None
    assert losses.DistillLoss.from_preset("crd", student_dim=4, teacher_dim=D).teachers[0].head_img is None


@pytest.mark.parametrize(
    "preset, params",
    [
        ("clip", set()),
        ("crd", set()),
        ("icl", {"teachers.0.scale_cross"}),
        ("vrd", {"teachers.0.scale_img", "teachers.0.scale_txt", "teachers.0.scale_cross"}),
        ("fd", set()),
        ("tinyclip", set()),
    ],
)
def test_only_the_parameters_active_terms_use_exist(preset, params):
    assert {n for n, _ in losses.DistillLoss.from_preset(preset).named_parameters()} == params
    loss = losses.DistillLoss.from_preset("cliprd", {"vrd": 0})
    assert loss.teachers[0].scale_img is None and "vrd" not in loss.weights


def test_needs_teacher_and_a_clip_loss_without_teacher():
    assert not losses.DistillLoss.from_preset("clip").needs_teacher
    assert losses.DistillLoss.from_preset("crd").needs_teacher
    _, _, s_img, s_txt, log_s, _ = module_inputs()
    total, parts = losses.DistillLoss.from_preset("clip")(None, None, s_img, s_txt, log_s)
    check(total, ref_task(s_img, s_txt, log_s.exp()), (s_img, s_txt, log_s))
    with pytest.raises(ValueError):
        losses.DistillLoss.from_preset("crd")(None, None, s_img, s_txt, log_s, 100.0)


def test_student_scale_is_clamped_at_100_and_scales_parameterised():
    _, _, s_img, s_txt, _, _ = module_inputs()
    total, _ = losses.DistillLoss.from_preset("clip")(None, None, s_img, s_txt, scalar(7.0))
    torch.testing.assert_close(total, ref_task(s_img, s_txt, 100.0), **TOL)

    raw = losses.DistillLoss.from_preset("cliprd")
    exp = losses.DistillLoss.from_preset("cliprd", scale_param="exp")
    assert raw.scales() == pytest.approx({k: math.log(1 / 0.07) for k in ("a_img", "a_txt", "a_cross")})
    assert exp.scales() == pytest.approx({k: 1 / 0.07 for k in ("a_img", "a_txt", "a_cross")}, rel=1e-6)
    with torch.no_grad():
        exp.teachers[0].scale_cross.fill_(6.0)
    assert exp.scales()["a_cross"] == pytest.approx(100.0)


def test_exp_scales_enter_the_terms_as_exp():
    loss = losses.DistillLoss.from_preset("xrd", scale_param="exp").double()
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs()
    _, parts = loss(t_img, t_txt, s_img, s_txt, log_s, tau)
    a_x = loss.teachers[0].scale_cross.exp()
    torch.testing.assert_close(parts["xrd"], ref_xrd(t_img, t_txt, s_img, s_txt, a_x).detach(), **TOL)


def test_param_groups_decay_head_matrices_only():
    loss = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D)
    decay, no_decay = loss.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 5  # 2 biases + 3 scales
    assert losses.DistillLoss.from_preset("clip").param_groups(0.1) == []


def test_half_precision_inputs_are_computed_in_float32():
    loss = losses.DistillLoss.from_preset("cliprd")
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs()
    as_bf16 = [x.detach().to(torch.bfloat16) for x in (t_img, t_txt, s_img, s_txt)]
    total, _ = loss(*as_bf16, log_s.detach().float(), tau)
    assert total.dtype == torch.float32 and torch.isfinite(total)


def test_state_dict_round_trip():
    a = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D)
    with torch.no_grad():
        a.teachers[0].scale_img.fill_(1.5)
    b = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D)
    b.load_state_dict(a.state_dict())
    assert b.scales()["a_img"] == 1.5
    assert set(a.state_dict()) == {
        f"teachers.0.{key}" for key in ("head_img.weight", "head_img.bias", "head_txt.weight",
                                          "head_txt.bias", "scale_img", "scale_txt", "scale_cross")
    }


def test_mismatched_shapes_get_a_clear_error():
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs(d_s=4)
    with pytest.raises(ValueError, match="student_dim and teacher_dim"):
        losses.DistillLoss.from_preset("fd").double()(t_img, t_txt, s_img, s_txt, log_s, tau)
    with pytest.raises(ValueError, match="one row per pair"):
        losses.DistillLoss.from_preset("clip")(None, None, s_img, s_txt[:3], log_s)


def test_a_v02_checkpoint_with_single_teacher_names_still_loads():
    a = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D)
    with torch.no_grad():
        a.teachers[0].scale_cross.fill_(1.25)
    v02 = {key.removeprefix("teachers.0."): value for key, value in a.state_dict().items()}
    assert "head_img.weight" in v02 and "scale_cross" in v02
    b = losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=D)
    b.load_state_dict(v02)  # strict: every name found
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------
# One teacher: exactly the single-teacher loss


GOLDEN = Path(__file__).with_name("data") / "loss_v02_golden.json"


def golden_case(preset: str) -> dict[str, torch.Tensor]:
    """DistillLoss's total, components and gradients on a fixed input, unequal dims; the
    keys of tests/data/loss_v02_golden.json (written by this function with the v0.2 loss)."""
    g = torch.Generator().manual_seed(42)

    def unit_rows(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    t_img, t_txt = unit_rows(6, 7), unit_rows(6, 7)
    s_img, s_txt = unit_rows(6, 4).requires_grad_(), unit_rows(6, 4).requires_grad_()
    log_s = torch.tensor(math.log(12.0), dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)  # the heads' init
    loss = losses.DistillLoss.from_preset(preset, student_dim=4, teacher_dim=7).double()
    total, parts = loss(t_img, t_txt, s_img, s_txt, log_s, 100.0)
    total.backward()
    out = {"total": total.detach(), **{f"parts/{k}": v for k, v in parts.items()},
           "grad/s_img": s_img.grad, "grad/s_txt": s_txt.grad, "grad/log_s": log_s.grad}
    out.update({f"param/{i}": p.detach() for i, p in enumerate(loss.parameters())})
    out.update({f"grad/param/{i}": p.grad for i, p in enumerate(loss.parameters())})
    return out


@pytest.mark.parametrize("preset", ["cliprd", "crd", "distill", "fd"])
def test_one_teacher_gives_the_v02_loss(preset):
    """Against numbers recorded with the single-teacher loss before ensembles existed: the
    same values, gradients, head init (global RNG) and parameter order. Bitwise on the
    machine that recorded them; 1e-12 here so another CPU's float64 BLAS may differ in the
    last bits."""
    want = json.loads(GOLDEN.read_text())[preset]
    got = golden_case(preset)
    assert list(got) == list(want)
    for key, value in got.items():
        expected = torch.tensor([float.fromhex(h) for h in want[key]], dtype=torch.float64)
        torch.testing.assert_close(value.flatten(), expected, rtol=1e-12, atol=1e-14, msg=key)


def grads_of(value, wrt):
    return [torch.zeros(()) if g is None else g
            for g in torch.autograd.grad(value, wrt, allow_unused=True)]


def assert_bitwise(a, b, wrt):
    """Same value and same gradients w.r.t. ``wrt``, bit for bit."""
    assert torch.equal(a, b), (a, b)
    for ga, gb in zip(grads_of(a, wrt), grads_of(b, wrt)):
        assert torch.equal(ga, gb)


def test_one_element_sequences_are_bitwise_the_tensor_call(batch):
    ti, tt, si, st = batch
    s, tau, ai, at, ax = scalar(9.0), scalar(30.0), scalar(2.659), scalar(3.1), scalar(2.2)
    one = dict(teacher_weights=[0.3])  # any weight of one teacher is 1
    wrt = (si, st, s, ai, at, ax)
    assert_bitwise(losses.crd(ti, tt, si, st, tau, s), losses.crd([ti], [tt], si, st, [tau], s, **one), wrt)
    assert_bitwise(losses.soft_target_kd(ti, tt, si, st, tau, s),
                   losses.soft_target_kd([ti], [tt], si, st, [tau], s, **one), wrt)
    assert_bitwise(losses.affinity_mimic(ti, tt, si, st, tau, s),
                   losses.affinity_mimic([ti], [tt], si, st, [tau], s, **one), wrt)
    assert_bitwise(losses.fd(ti, tt, si, st), losses.fd([ti], [tt], [si], [st], **one), wrt)
    assert_bitwise(losses.icl(ti, tt, si, st, ax), losses.icl([ti], [tt], [si], [st], [ax], **one), wrt)
    assert_bitwise(losses.vrd(ti, tt, si, st, ai, at),
                   losses.vrd([ti], [tt], [si], [st], [ai], [at], **one), wrt)
    assert_bitwise(losses.xrd(ti, tt, si, st, ax), losses.xrd([ti], [tt], [si], [st], [ax], **one), wrt)


@pytest.mark.parametrize("preset", ["cliprd", "crd", "distill", "fd"])
def test_a_one_teacher_list_is_bitwise_the_tensor_call_of_the_module(preset):
    t_img, t_txt, s_img, s_txt, log_s, tau = module_inputs(d_s=4)
    torch.manual_seed(0)
    bare = losses.DistillLoss.from_preset(preset, student_dim=4, teacher_dim=D).double()
    torch.manual_seed(0)
    listed = losses.DistillLoss.from_preset(preset, student_dim=4, teacher_dim=[D],
                                            teacher_weights=[2.0]).double()
    total_a, parts_a = bare(t_img, t_txt, s_img, s_txt, log_s, tau)
    total_b, parts_b = listed([t_img], [t_txt], s_img, s_txt, log_s, [tau])
    assert parts_a.keys() == parts_b.keys()
    assert all(torch.equal(parts_a[k], parts_b[k]) for k in parts_a)
    assert torch.equal(total_a, total_b)
    grads_a = grads_of(total_a, (s_img, s_txt, log_s, *bare.parameters()))
    grads_b = grads_of(total_b, (s_img, s_txt, log_s, *listed.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert bare.scales().keys() == listed.scales().keys()


# ---------------------------------------------------------------------------------------
# An ensemble of teachers against a float64 reference written from the formulas:
# targets mixed as probabilities sum_k w_k softmax(L_k), KLs and per-teacher terms averaged
# with w_k, by explicit loops over teachers and rows.

ENS_TOL = dict(rtol=1e-9, atol=1e-10)
WIDTHS, W = (6, 10), (0.7, 0.3)
GIVEN_WEIGHTS = (1.4, 0.6)  # what the tests pass: the loss must normalise them to W


def ref_softmax_row(row):
    return [torch.exp(v) for v in ref_log_softmax_row(row)]


def ref_mixed_rows(targets, weights):
    """Row i of the mixture: [sum_k w_k softmax(targets_k[i])_j for j], targets detached."""
    per_teacher = [[ref_softmax_row(row) for row in ref_rows(t.detach())] for t in targets]
    n_rows, n_cols = targets[0].shape
    return [[sum(w * per_teacher[k][i][j] for k, w in enumerate(weights)) for j in range(n_cols)]
            for i in range(n_rows)]


def ref_kl_mixed(targets, weights, inp):
    """sum_j p_bar_j (log p_bar_j - log q_j), mean over rows."""
    total = 0.0
    for p_row, i_row in zip(ref_mixed_rows(targets, weights), ref_rows(inp)):
        log_q = ref_log_softmax_row(i_row)
        total = total + sum(p * (torch.log(p) - lq) for p, lq in zip(p_row, log_q))
    return total / inp.shape[0]


def ref_soft_ce_mixed(targets, weights, inp):
    total = 0.0
    for p_row, i_row in zip(ref_mixed_rows(targets, weights), ref_rows(inp)):
        total = total - sum(p * lq for p, lq in zip(p_row, ref_log_softmax_row(i_row)))
    return total / inp.shape[0]


def ref_weighted(values, weights):
    return sum(w * v for w, v in zip(weights, values))


def transposed(ms):
    return [m.T for m in ms]


def ref_ens_crd(tis, tts, si, st, taus, s, w):
    targets = [tau * ti @ tt.T for ti, tt, tau in zip(tis, tts, taus)]
    return 0.5 * (ref_kl_mixed(targets, w, s * si @ st.T)
                  + ref_kl_mixed(transposed(targets), w, s * st @ si.T))


def ref_ens_soft_target(tis, tts, si, st, taus, s, w):
    targets = [tau * ti @ tt.T for ti, tt, tau in zip(tis, tts, taus)]
    return 0.5 * (ref_soft_ce_mixed(targets, w, s * si @ st.T)
                  + ref_soft_ce_mixed(transposed(targets), w, s * st @ si.T))


def ref_ens_vrd(tis, tts, pis, pts, ais, ats, w):
    m_img = [a * ti @ pi.T for ti, pi, a in zip(tis, pis, ais)]
    m_txt = [a * tt @ pt.T for tt, pt, a in zip(tts, pts, ats)]
    kl = 0.5 * (ref_weighted([ref_kl_mixed(m_txt, w, m) for m in m_img], w)
                + ref_weighted([ref_kl_mixed(transposed(m_txt), w, m.T) for m in m_img], w))
    ce = ref_weighted([ref_vrd_ce(*args) for args in zip(tis, tts, pis, pts, ais, ats)], w)
    return kl + ce


def ref_ens_xrd(tis, tts, pis, pts, axs, w):
    a = [ax * ti @ pt.T for ti, pt, ax in zip(tis, pts, axs)]
    b = [ax * tt @ pi.T for tt, pi, ax in zip(tts, pis, axs)]
    return 0.25 * sum(
        ref_weighted([ref_kl_mixed(target, w, x) for x in inputs], w)
        for target, inputs in ((b, a), (a, b), (transposed(b), transposed(a)),
                               (transposed(a), transposed(b))))


def ref_ens_icl(tis, tts, pis, pts, axs, w):
    return ref_weighted([ref_icl(*args) for args in zip(tis, tts, pis, pts, axs)], w)


def ref_ens_fd(tis, tts, pis, pts, w):
    return ref_weighted([ref_fd(*args) for args in zip(tis, tts, pis, pts)], w)


@pytest.fixture
def ensemble():
    """Two teachers of widths 6 and 10; the student's S (width D) and its P in each teacher's
    space (the heads' outputs), correlated with the teachers; every scale its own."""
    tis = [unit(N, d, seed=20 + k) for k, d in enumerate(WIDTHS)]
    tts = [unit(N, d, seed=30 + k) for k, d in enumerate(WIDTHS)]
    pis = [leaf(F.normalize(t + 0.8 * unit(N, t.shape[1], seed=40 + k), dim=-1)) for k, t in enumerate(tis)]
    pts = [leaf(F.normalize(t + 0.8 * unit(N, t.shape[1], seed=50 + k), dim=-1)) for k, t in enumerate(tts)]
    si, st = leaf(unit(N, D, seed=60)), leaf(unit(N, D, seed=61))
    scales = dict(s=scalar(9.0), taus=(30.0, 12.0), ais=(scalar(2.659), scalar(4.0)),
                  ats=(scalar(3.1), scalar(1.7)), axs=(scalar(2.2), scalar(5.0)))
    return tis, tts, pis, pts, si, st, scales


def check_tight(value, ref, wrt):
    torch.testing.assert_close(value, ref, **ENS_TOL)
    for g, w in zip(grads_of(value, wrt), grads_of(ref, wrt)):
        torch.testing.assert_close(g.double(), w.double(), **ENS_TOL)


def test_ensemble_crd_and_soft_target(ensemble):
    tis, tts, _, _, si, st, sc = ensemble
    wrt = (si, st, sc["s"])
    tw = dict(teacher_weights=GIVEN_WEIGHTS)
    check_tight(losses.crd(tis, tts, si, st, sc["taus"], sc["s"], **tw),
                ref_ens_crd(tis, tts, si, st, sc["taus"], sc["s"], W), wrt)
    check_tight(losses.soft_target_kd(tis, tts, si, st, sc["taus"], sc["s"], **tw),
                ref_ens_soft_target(tis, tts, si, st, sc["taus"], sc["s"], W), wrt)


def test_ensemble_fd_and_icl(ensemble):
    tis, tts, pis, pts, _, _, sc = ensemble
    tw = dict(teacher_weights=GIVEN_WEIGHTS)
    check_tight(losses.fd(tis, tts, pis, pts, **tw), ref_ens_fd(tis, tts, pis, pts, W), (*pis, *pts))
    check_tight(losses.icl(tis, tts, pis, pts, sc["axs"], **tw),
                ref_ens_icl(tis, tts, pis, pts, sc["axs"], W), (*pis, *pts, *sc["axs"]))


def test_ensemble_vrd(ensemble):
    tis, tts, pis, pts, _, _, sc = ensemble
    value = losses.vrd(tis, tts, pis, pts, sc["ais"], sc["ats"], teacher_weights=GIVEN_WEIGHTS)
    check_tight(value, ref_ens_vrd(tis, tts, pis, pts, sc["ais"], sc["ats"], W),
                (*pis, *pts, *sc["ais"], *sc["ats"]))


def test_ensemble_xrd(ensemble):
    tis, tts, pis, pts, _, _, sc = ensemble
    value = losses.xrd(tis, tts, pis, pts, sc["axs"], teacher_weights=GIVEN_WEIGHTS)
    check_tight(value, ref_ens_xrd(tis, tts, pis, pts, sc["axs"], W), (*pis, *pts, *sc["axs"]))


def test_equal_weights_by_default_and_a_zero_weight_drops_a_teacher(ensemble):
    tis, tts, pis, pts, _, _, sc = ensemble
    check_tight(losses.xrd(tis, tts, pis, pts, sc["axs"]),
                ref_ens_xrd(tis, tts, pis, pts, sc["axs"], (0.5, 0.5)), (*pis, *pts, *sc["axs"]))
    torch.testing.assert_close(
        losses.vrd(tis, tts, pis, pts, sc["ais"], sc["ats"], teacher_weights=(0, 2)),
        losses.vrd(tis[1], tts[1], pis[1], pts[1], sc["ais"][1], sc["ats"][1]), **ENS_TOL)


def test_the_mixture_is_not_the_average_of_the_teachers_losses(ensemble):
    """Mixing the targets (the ensemble's choice) differs from averaging single-teacher KLs."""
    tis, tts, _, _, si, st, sc = ensemble
    mixed = losses.crd(tis, tts, si, st, sc["taus"], sc["s"], teacher_weights=W)
    averaged = sum(w * losses.crd(ti, tt, si, st, tau, sc["s"])
                   for w, ti, tt, tau in zip(W, tis, tts, sc["taus"]))
    assert (averaged - mixed).item() > 1e-3  # KL is convex in its target: the average is larger


@pytest.mark.parametrize(
    "weights, message",
    [((1.0, -0.5), ">= 0"), ((0.0, 0.0), "not all 0"), ((1.0,), "1 teacher weights given for 2"),
     ((1.0, float("inf")), "finite")],
)
def test_bad_teacher_weights_raise_one_line_user_errors(weights, message):
    with pytest.raises(UserError) as err:
        losses.DistillLoss.from_preset("cliprd", student_dim=4, teacher_dim=[6, 10], teacher_weights=weights)
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError):
        losses.fd([unit(N, 6, seed=1)] * 2, [unit(N, 6, seed=2)] * 2, [unit(N, 6, seed=3)] * 2,
                  [unit(N, 6, seed=4)] * 2, teacher_weights=weights)


def test_module_ensemble_has_heads_and_scales_per_teacher_and_equals_the_pure_terms(ensemble):
    tis, tts, _, _, si, st, sc = ensemble
    loss = losses.DistillLoss.from_preset("cliprd", {"soft_target": 0.5}, student_dim=D,
                                          teacher_dim=list(WIDTHS), teacher_weights=GIVEN_WEIGHTS).double()
    assert [link.head_img.weight.shape for link in loss.teachers] == [(6, D), (10, D)]
    assert [link.head_txt.weight.shape for link in loss.teachers] == [(6, D), (10, D)]
    with torch.no_grad():  # every teacher its own scales
        for link, ai, at, ax in zip(loss.teachers, sc["ais"], sc["ats"], sc["axs"]):
            link.scale_img.copy_(ai), link.scale_txt.copy_(at), link.scale_cross.copy_(ax)
    assert set(loss.scales()) == {f"{a}/{k}" for a in ("a_img", "a_txt", "a_cross") for k in (0, 1)}
    assert {k.split(".")[1] for k in loss.state_dict()} == {"0", "1"}
    log_s = scalar(math.log(9.0))
    total, parts = loss(tis, tts, si, st, log_s, sc["taus"])

    projected = [link.project(si, st) for link in loss.teachers]
    pis, pts = [p for p, _ in projected], [p for _, p in projected]
    ais, ats, axs = ([getattr(link, name) for link in loss.teachers]
                     for name in ("scale_img", "scale_txt", "scale_cross"))
    tw = dict(teacher_weights=GIVEN_WEIGHTS)
    want = {
        "task": losses.clip_task(si, st, log_s.exp()),
        "crd": losses.crd(tis, tts, si, st, sc["taus"], log_s.exp(), **tw),
        "fd": 2000 * losses.fd(tis, tts, pis, pts, **tw),
        "icl": losses.icl(tis, tts, pis, pts, axs, **tw),
        "vrd": losses.vrd(tis, tts, pis, pts, ais, ats, **tw),
        "xrd": losses.xrd(tis, tts, pis, pts, axs, **tw),
        "soft_target": 0.5 * losses.soft_target_kd(tis, tts, si, st, sc["taus"], log_s.exp(), **tw),
    }
    assert parts.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(parts[name], value.detach(), **ENS_TOL)
    # the gradient reaches each teacher's own heads and scales
    wrt = (si, st, log_s, *loss.parameters())
    got = grads_of(total, wrt)
    for g, w in zip(got, grads_of(sum(want.values()), wrt)):
        torch.testing.assert_close(g, w, **ENS_TOL)
    assert all(g.abs().max() > 0 for g in got[3:])


def test_module_refuses_a_wrong_teacher_count_or_width(ensemble):
    tis, tts, _, _, si, st, sc = ensemble
    loss = losses.DistillLoss.from_preset("icl", student_dim=D, teacher_dim=list(WIDTHS)).double()
    with pytest.raises(ValueError, match="1 given for 2 teachers"):
        loss(tis[0], tts[0], si, st, scalar(2.0), 30.0)
    with pytest.raises(ValueError, match="teacher 1's dim 6"):
        loss([tis[0], tis[0]], [tts[0], tts[0]], si, st, scalar(2.0), 30.0)
