"""LR schedules: each kind's shape, re-warm, phase labels, invariants, validation, torch, plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from midtrain.config_io import validate
from midtrain.errors import ConfigError
from midtrain.training.schedule import ScheduleConfig, plot_schedule

PEAK = 1e-3


def sched(total: int = 100, peak: float = PEAK, rewarm_from_lr: float | None = None, **cfg):
    return ScheduleConfig(**cfg).build(peak, total, rewarm_from_lr=rewarm_from_lr)


# --- shapes ------------------------------------------------------------------------------------


def test_warmup_is_linear_from_zero_and_reaches_peak_at_its_end():
    s = sched(kind="constant", warmup_steps=10)
    assert s.lr(0) == 0.0
    assert s.lr(5) == pytest.approx(PEAK / 2)
    assert s.lr(9) == pytest.approx(0.9 * PEAK)
    assert s.lr(10) == PEAK
    assert [s.phase(i) for i in (0, 9, 10, 99)] == ["warmup", "warmup", "stable", "stable"]
    assert all(s.lr(i) == PEAK for i in range(10, 100))


def test_warmup_start_ratio():
    s = sched(kind="constant", warmup_steps=4, warmup_start_ratio=0.2)
    assert [s.lr(i) for i in range(5)] == pytest.approx([0.2e-3, 0.4e-3, 0.6e-3, 0.8e-3, 1e-3])


def test_no_warmup_starts_at_peak():
    s = sched(kind="constant")
    assert s.lr(0) == PEAK and s.phase(0) == "stable"


def test_wsd_is_constant_when_stable_and_reaches_min_lr_at_the_last_step():
    s = sched(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    assert s.decay_start == 80
    assert all(s.lr(i) == PEAK for i in range(10, 80))
    assert s.lr(80) < PEAK
    assert s.lr(99) == pytest.approx(0.1 * PEAK, abs=0, rel=1e-12)
    min_lr = 0.1 * PEAK
    for k in range(20):  # linear: progress (k + 1) / 20
        assert s.lr(80 + k) == pytest.approx(min_lr + (PEAK - min_lr) * (1 - (k + 1) / 20))
    labels = [s.phase(i) for i in (0, 9, 10, 79, 80, 99)]
    assert labels == ["warmup", "warmup", "stable", "stable", "decay", "decay"]


def test_wsd_decay_shapes():
    lin = sched(kind="wsd", decay_fraction=0.2, decay_shape="linear")
    cos = sched(kind="wsd", decay_fraction=0.2, decay_shape="cosine")
    sqrt = sched(kind="wsd", decay_fraction=0.2, decay_shape="1-sqrt")
    # progress 1/4 at step 84 (decay of 20 steps from step 80): 1-sqrt has dropped half the way.
    assert sqrt.lr(84) == pytest.approx(PEAK * (1 - math.sqrt(0.25)))
    assert sqrt.lr(84) == pytest.approx(PEAK / 2)
    assert cos.lr(89) == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi * 0.5)))
    for i in range(80, 99):  # 1-sqrt is convex: below the line all the way down
        assert sqrt.lr(i) < lin.lr(i)
    for i in range(80, 89):  # cosine: above the line in the first half, below in the second
        assert cos.lr(i) > lin.lr(i) and cos.lr(178 - i) < lin.lr(178 - i)
    for s in (lin, cos, sqrt):
        assert s.lr(99) == 0.0


def test_cosine_formula():
    s = sched(total=45, kind="cosine", warmup_steps=5, min_lr_ratio=0.1)
    lo = 0.1 * PEAK
    assert s.lr(4) == pytest.approx(0.8 * PEAK)
    for step in range(5, 45):
        p = (step - 4) / 40
        assert s.lr(step) == pytest.approx(lo + (PEAK - lo) * 0.5 * (1 + math.cos(math.pi * p)))
    assert s.lr(24) == pytest.approx((PEAK + lo) / 2)  # half way down at progress 1/2
    assert s.lr(44) == pytest.approx(lo)
    assert [s.phase(i) for i in (4, 5, 44)] == ["warmup", "decay", "decay"]


def test_linear_kind_decays_over_the_whole_rest():
    s = sched(total=30, kind="linear", warmup_steps=10)
    assert s.lr(9) == pytest.approx(0.9 * PEAK)
    assert [s.lr(i) for i in range(10, 30)] == pytest.approx(
        [PEAK * (1 - (k + 1) / 20) for k in range(20)]
    )
    assert s.phase(10) == "decay"


def test_constant_never_decays():
    s = sched(kind="constant", warmup_steps=3)
    assert {s.phase(i) for i in range(100)} == {"warmup", "stable"}
    assert s.segments() == [("warmup", 0, 3), ("stable", 3, 100)]


def test_rewarm_starts_at_checkpoint_lr_reaches_peak_then_decays():
    s = sched(kind="wsd", rewarm_steps=10, decay_fraction=0.2, rewarm_from_lr=6e-4)
    assert s.rewarm and s.warmup_steps == 10  # rewarm_steps replaces warmup_steps
    assert s.lr(0) == 6e-4
    assert s.lr(5) == pytest.approx(8e-4)
    assert s.lr(10) == PEAK
    assert s.phase(9) == "rewarm" and s.phase(10) == "stable"  # as checkpoints record it
    assert s.segments()[0] == ("rewarm", 0, 10)
    assert s.phase(80) == "decay" and s.lr(99) == 0.0


def test_rewarm_into_cosine():
    s = sched(total=50, kind="cosine", rewarm_steps=10, rewarm_from_lr=2e-4)
    assert s.lr(0) == 2e-4 and s.lr(10) == pytest.approx(PEAK * 0.5 * (1 + math.cos(math.pi / 40)))
    assert s.lr(49) == 0.0


def test_rewarm_from_unknown_lr_starts_at_zero_and_lr_is_ignored_without_rewarm():
    assert sched(kind="constant", rewarm_steps=4).lr(0) == 0.0
    plain = sched(kind="constant", warmup_steps=4, rewarm_from_lr=5e-4)
    assert plain.lr(0) == 0.0 and not plain.rewarm and plain.rewarm_from_lr is None


def test_rewarm_down_to_a_lower_peak():
    s = sched(kind="constant", rewarm_steps=4, rewarm_from_lr=3e-3)
    assert [s.lr(i) for i in range(5)] == pytest.approx([3e-3, 2.5e-3, 2e-3, 1.5e-3, 1e-3])


def test_single_step_runs():
    assert sched(total=1, kind="wsd", min_lr_ratio=0.5).lr(0) == 0.5 * PEAK
    assert sched(total=1, kind="constant").lr(0) == PEAK
    assert sched(total=1, kind="cosine").phase(0) == "decay"


# --- invariants (hypothesis) -------------------------------------------------------------------


@st.composite
def schedules(draw):
    kind = draw(st.sampled_from(["constant", "wsd", "cosine", "linear"]))
    cfg: dict = {"kind": kind}
    if draw(st.booleans()):
        cfg["rewarm_steps"] = draw(st.integers(0, 300))
    else:
        cfg["warmup_steps"] = draw(st.integers(0, 300))
        cfg["warmup_start_ratio"] = draw(st.floats(0, 1))
    if kind == "wsd":
        cfg["decay_fraction"] = draw(st.floats(0, 1))
        cfg["decay_shape"] = draw(st.sampled_from(["linear", "cosine", "1-sqrt"]))
    if kind != "constant":
        cfg["min_lr_ratio"] = draw(st.floats(0, 1))
    total = draw(st.integers(1, 600))
    peak = draw(st.floats(1e-7, 10))
    config = ScheduleConfig(**cfg)
    assume(config.steps_error(total) is None)
    rewarm_from = draw(st.one_of(st.none(), st.floats(0, peak)))
    return config.build(peak, total, rewarm_from_lr=rewarm_from)


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_invariants(s):
    lrs = [s.lr(i) for i in range(s.total_steps)]
    phases = [s.phase(i) for i in range(s.total_steps)]
    assert all(0.0 <= lr <= s.peak_lr for lr in lrs)
    w = s.warmup_steps
    assert all(a <= b for a, b in zip(lrs[:w], lrs[1:w], strict=False))  # warmup goes up
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :], strict=False))  # then never up
    assert all(lr == s.peak_lr for lr, p in zip(lrs, phases, strict=True) if p == "stable")
    if s.min_lr <= 0.999 * s.peak_lr:  # (not when the floor is the peak, to the last ulp)
        assert all(lr < s.peak_lr for lr, p in zip(lrs, phases, strict=True) if p == "decay")
    if w < s.total_steps:
        assert lrs[w] == s.peak_lr or phases[w] == "decay"
    if phases[-1] == "decay":
        assert lrs[-1] == pytest.approx(s.min_lr, rel=1e-12, abs=1e-300)
    # segments() and phase() agree, and cover the run in order
    from_segments = [p for p, a, b in s.segments() for _ in range(a, b)]
    assert from_segments == phases
    assert phases == sorted(phases, key=["warmup", "rewarm", "stable", "decay"].index)


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"kind": "step"}, "kind"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"decay_fraction": 1.5}, "decay_fraction"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"rewarm_steps": -5}, "rewarm_steps"),
        ({"decay_shape": "exp"}, "decay_shape"),
        ({"warmup": 10}, "warmup"),
        ({"kind": "cosine", "decay_shape": "1-sqrt"}, "decay_shape"),
        ({"kind": "linear", "decay_fraction": 0.5}, "decay_fraction"),
        ({"kind": "constant", "min_lr_ratio": 0.1}, "min_lr_ratio"),
        ({"rewarm_steps": 5, "warmup_steps": 3}, "schedule.warmup_steps (3) is not used with"),
        ({"rewarm_steps": 5, "warmup_start_ratio": 0.5}, "warmup_start_ratio (0.5) is not used"),
        ({"warmup_steps": True}, "warmup_steps"),
    ],
)
def test_invalid_configs_name_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        validate(ScheduleConfig, data, "run.yaml")
    assert "run.yaml" in str(exc.value) and key in str(exc.value)


def test_warmup_plus_decay_longer_than_the_run():
    cfg = ScheduleConfig(kind="wsd", warmup_steps=90, decay_fraction=0.2)
    with pytest.raises(ConfigError) as exc:
        cfg.build(PEAK, 100)
    msg = str(exc.value)
    assert "schedule.warmup_steps (90)" in msg and "schedule.decay_fraction" in msg
    assert "110 steps" in msg and "100 steps" in msg
    assert cfg.steps_error(100) == msg and cfg.steps_error(120) is None


def test_rewarm_too_long_names_rewarm_steps():
    msg = ScheduleConfig(kind="wsd", rewarm_steps=95).steps_error(100)
    assert msg is not None and "schedule.rewarm_steps (95)" in msg


def test_cosine_needs_a_step_to_decay_in():
    cfg = ScheduleConfig(kind="cosine", warmup_steps=100)
    assert "schedule.warmup_steps (100)" in (cfg.steps_error(100) or "")
    assert cfg.steps_error(101) is None
    assert ScheduleConfig(kind="constant", warmup_steps=100).steps_error(100) is None
    assert "longer than the run" in (
        ScheduleConfig(kind="constant", warmup_steps=101).steps_error(100) or ""
    )


def test_a_positive_decay_fraction_never_rounds_to_no_decay():
    s = sched(total=10, kind="wsd", decay_fraction=0.01)
    assert s.decay_start == 9 and s.phase(9) == "decay"


@pytest.mark.parametrize(
    "args",
    [
        (0.0, 100, None),
        (float("nan"), 100, None),
        (PEAK, 0, None),
        (PEAK, 100, -1e-4),
        (PEAK, 100, float("nan")),
    ],
)
def test_bad_build_arguments(args):
    with pytest.raises(ValueError):
        ScheduleConfig().build(*args)


def test_steps_outside_the_run_are_errors():
    s = sched(total=10)
    for step in (-1, 10):
        with pytest.raises(ValueError, match="outside"):
            s.lr(step)
        with pytest.raises(ValueError, match="outside"):
            s.phase(step)


# --- state -------------------------------------------------------------------------------------


def test_state_dict_is_json_and_changes_are_reported():
    s = sched(kind="wsd", rewarm_steps=10, rewarm_from_lr=6e-4, min_lr_ratio=0.1)
    saved = json.loads(json.dumps(s.state_dict()))
    assert saved["kind"] == "wsd" and saved["peak_lr"] == PEAK and saved["total_steps"] == 100
    assert saved["warmup_steps"] == 10 and saved["rewarm_from_lr"] == 6e-4
    assert s.changes(saved) == []
    # Resume: the saved rewarm_from_lr rebuilds the same schedule.
    again = ScheduleConfig(kind="wsd", rewarm_steps=10, min_lr_ratio=0.1).build(
        PEAK, 100, rewarm_from_lr=saved["rewarm_from_lr"]
    )
    assert again == s
    other = sched(peak=2e-3, kind="wsd", rewarm_steps=10, rewarm_from_lr=6e-4, min_lr_ratio=0.1)
    changes = other.changes(saved)
    assert any(c.startswith("peak_lr: 0.001 -> 0.002") for c in changes)
    assert any(c.startswith("min_lr:") for c in changes)
    assert not any(c.startswith("kind") for c in changes)


# --- torch -------------------------------------------------------------------------------------


def test_apply_sets_every_param_group_and_the_step_uses_it():
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "lr": 5.0}], lr=7.0)
    s = sched(total=20, kind="constant", warmup_steps=10, peak=0.5)
    assert s.apply(opt.param_groups, 4) == pytest.approx(0.2)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.2)] * 2
    (w.sum() + b.sum()).backward()
    opt.step()
    assert torch.allclose(w, torch.full((3,), 0.8)) and torch.allclose(b, torch.full((1,), 0.8))
    s.apply(opt.param_groups, 15)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


# --- plot --------------------------------------------------------------------------------------


def _colours(path) -> int:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_plot_is_a_real_png(tmp_path):
    s = sched(total=1000, kind="wsd", rewarm_steps=100, rewarm_from_lr=4e-4)
    out = plot_schedule(s, None, tmp_path / "sub" / "lr.png", title="branch")
    assert out == tmp_path / "sub" / "lr.png" and out.is_file()
    with Image.open(out) as img:
        assert img.size == (880, 440)
    assert _colours(out) > 50  # the curve, three phase shades, text: far from one colour
    assert [p.name for p in out.parent.iterdir()] == ["lr.png"]  # no temporary left


def test_plot_part_of_a_run_and_reject_more_than_the_run(tmp_path):
    s = sched(total=500, kind="cosine", warmup_steps=50)
    assert _colours(plot_schedule(s, 40, tmp_path / "a.png")) > 10
    with pytest.raises(ValueError):
        plot_schedule(s, 501, tmp_path / "b.png")
    assert not (tmp_path / "b.png").exists()
