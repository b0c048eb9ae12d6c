import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from modsquad.core.errors import UserError
from modsquad.tasks.metrics import (
    ClassificationMetric,
    EdgeMetric,
    MultiTaskMetrics,
    NormalMetric,
    RegressionMetric,
    SaliencyMetric,
    SegmentationMetric,
    build_metrics,
    delta_m,
    max_filter,
    thin_edges,
    zero_baseline_tasks,
)
from modsquad.tasks.registry import IGNORE_INDEX, TASKS, get_task


def test_regression_hand_case():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[True, True], [True, False]]).view(1, 2, 2)
    m = RegressionMetric()
    m.update(pred, torch.zeros_like(pred), mask)
    out = m.compute()
    assert out["l1"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3; the masked 5 is ignored
    assert out["rmse"] == pytest.approx(math.sqrt(14 / 3))  # sqrt((1 + 4 + 9) / 3)


def test_regression_pools_pixels_not_images():
    m = RegressionMetric()
    m.update(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # 1 pixel, error 1
    m.update(torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3))  # 3 pixels, error 0
    assert m.compute()["l1"] == pytest.approx(0.25)  # per-image mean would be 0.5


def test_normal_hand_case():
    z = torch.tensor([0.0, 0.0, 1.0])
    s25, c25 = math.sin(math.radians(25)), math.cos(math.radians(25))
    # angles to +z: 0, 90, 45, 25 degrees (the 45 and 25 ones are not unit length: normalised inside)
    pred = torch.stack([z, torch.tensor([1.0, 0, 0]), torch.tensor([2.0, 0, 2.0]), torch.tensor([s25, 0, c25])])
    pred = pred.t().reshape(1, 3, 1, 4)
    target = z.view(1, 3, 1, 1).expand(1, 3, 1, 4)
    m = NormalMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["mean_angle"] == pytest.approx(40.0, abs=1e-4)  # (0 + 90 + 45 + 25) / 4
    assert out["median_angle"] == pytest.approx(25.0, abs=0.01)  # 2nd of [0, 25, 45, 90], 0.01-deg bins
    assert out["within_11.25"] == pytest.approx(25.0)
    assert out["within_22.5"] == pytest.approx(25.0)
    assert out["within_30"] == pytest.approx(50.0)
    assert set(out) == set(get_task("normal").metrics)


def test_normal_mask():
    pred = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]).view(1, 3, 1, 2)  # 0 and 90 degrees
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 1, 2)
    m = NormalMetric()
    m.update(pred, target, torch.tensor([[[True, False]]]))
    assert m.compute()["mean_angle"] == pytest.approx(0.0, abs=1e-4)


def test_segmentation_hand_case():
    target = torch.tensor([[[0, 0, IGNORE_INDEX], [1, 2, 1]]])
    pred = torch.tensor([[[0, 1, 3], [1, 1, 1]]])
    mask = torch.tensor([[[True, True, True], [True, True, False]]])  # drops the last pixel
    m = SegmentationMetric(num_classes=4)
    m.update(pred, target, mask)
    # valid pixels (t -> p): 0->0, 0->1, 1->1, 2->1. IoU: c0 1/2, c1 1/3, c2 0/1; c3 in neither -> skipped
    out = m.compute()
    assert out["miou"] == pytest.approx(100 * (1 / 2 + 1 / 3 + 0) / 3)
    assert out["pixel_acc"] == pytest.approx(50.0)
    iou = m.per_class_iou()
    assert math.isnan(iou[3].item()) and iou[0].item() == pytest.approx(0.5)


def test_segmentation_from_logits_at_lower_resolution():
    logits = torch.zeros(1, 3, 1, 1)
    logits[0, 2] = 5.0  # class 2 everywhere after bilinear upsampling
    m = SegmentationMetric(3)
    m.update(logits, torch.tensor([[[2, 2], [2, 0]]]))
    assert m.compute()["pixel_acc"] == pytest.approx(75.0)
    assert m.compute()["miou"] == pytest.approx(100 * (0 + 3 / 4) / 2)  # class 1 in neither: skipped


def test_saliency_hand_case():
    prob = torch.tensor([0.9, 0.6, 0.3, 0.1]).view(1, 1, 1, 4)
    gt = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4)
    m = SaliencyMetric(from_logits=False)
    m.update(prob, gt)
    out = m.compute()
    # F_b(P, R) = 1.3 P R / (0.3 P + R). t < 0.1: (1/2, 1) -> .565; [0.1, 0.3): (2/3, 1) -> .722;
    # [0.3, 0.6): (1/2, 1/2) -> .5; [0.6, 0.9): (1, 1/2) -> .8125; >= 0.9: nothing predicted -> 0
    assert out["maxf"] == pytest.approx(81.25)
    # foreground IoU at the thresholds 0.2, 0.25, ..., 0.9: [0.2, 0.3): {.9, .6, .3} vs {.9, .3} -> 2/3;
    # [0.3, 0.6): 1/3; [0.6, 0.9): 1/2; 0.9: 0 -> the best is 2/3
    assert out["miou"] == pytest.approx(200 / 3)
    logit = torch.log(prob / (1 - prob))
    m2 = SaliencyMetric()
    m2.update(logit, gt)
    assert m2.compute() == pytest.approx(out)


def _saliency_miou_reference(probs, gts, valids):
    """ASTMT / Multi-Task-Learning-PyTorch `eval_sal` (jaccard with void pixels), written out with numpy."""
    thresholds = np.linspace(0.2, 0.9, 15)
    per_image = []
    for p, g, v in zip(probs, gts, valids, strict=True):
        if not v.any():
            continue
        row = []
        for t in thresholds:
            m, gg = (p > t) & v, g.astype(bool) & v
            row.append(1.0 if not m.any() and not gg.any() else (m & gg).sum() / (m | gg).sum())
        per_image.append(row)
    return 100 * np.mean(per_image, 0).max()


def test_saliency_miou_is_the_per_image_mean_of_the_mtl_benchmark():
    rng = np.random.default_rng(0)
    probs = [rng.random((9, 7)) for _ in range(6)]
    gts = [rng.random((9, 7)) > 0.6 for _ in range(6)]
    valids = [rng.random((9, 7)) > 0.2 for _ in range(6)]
    gts[2][:], probs[2][:] = False, 0.1  # no salient pixel in target or prediction: IoU 1
    valids[4][:] = False  # no valid pixel: the image is skipped
    m = SaliencyMetric(from_logits=False)
    for p, g, v in zip(probs, gts, valids, strict=True):
        m.update(torch.tensor(p)[None, None], torch.tensor(g, dtype=torch.float64)[None, None],
                 torch.tensor(v)[None])
    assert m.compute()["miou"] == pytest.approx(_saliency_miou_reference(probs, gts, valids))
    # per image, not pooled: a 3-row object found in 2 rows scores 2/3 whatever the other images hold
    g = torch.zeros(1, 1, 10, 10)
    g[..., :3, :] = 1
    p = torch.zeros(1, 1, 10, 10)
    p[..., :2, :] = 0.9
    one = SaliencyMetric(from_logits=False)
    one.update(p, g)
    assert one.compute()["miou"] == pytest.approx(200 / 3)


def test_segment_semantic_never_predicts_or_scores_the_uncertain_class():
    metric = build_metrics("segment_semantic")
    target = torch.arange(1, 17).view(1, 4, 4)
    logits = torch.nn.functional.one_hot(target, 18).permute(0, 3, 1, 2).float()
    logits[0, 0, 0, 0] = 10.0  # channel 0 ("uncertain") is the largest at one pixel: not a label, skipped
    metric.update(logits, target)
    assert metric.compute() == {"miou": pytest.approx(100.0), "pixel_acc": pytest.approx(100.0)}
    labels = target.clone()
    labels[0, 0, 0] = 0  # a label below first_label is a miss for the target's class, not a class of its own
    miss = build_metrics("segment_semantic")
    miss.update(labels, target)
    assert miss.compute()["miou"] == pytest.approx(100 * 15 / 16)
    assert math.isnan(miss.per_class_iou()[0].item())
    assert get_task("segment_semantic").class_ids(logits[0]).min().item() == 1


def _edge_case():
    """GT: a vertical edge at column 2 of a 5x5 image. Prediction: 0.8 at column 3 on rows 0-2, 0.4 at column 3
    on rows 3-4 (1 px from the GT), 0.6 on column 0 (2 px from the GT)."""
    gt = torch.zeros(1, 1, 5, 5)
    gt[..., 2] = 1.0
    prob = torch.zeros(1, 1, 5, 5)
    prob[0, 0, :3, 3] = 0.8
    prob[0, 0, 3:, 3] = 0.4
    prob[..., 0] = 0.6
    return prob, gt


def test_edge_ods_hand_case():
    prob, gt = _edge_case()
    m = EdgeMetric(tolerance_px=1.0, from_logits=False)
    m.update(prob, gt)
    # t < .4: P = 5/10, R = 5/5 -> F .667; [.4, .6): P 3/8, R 3/5 -> .46; [.6, .8): P 3/3, R 3/5 -> .75
    assert m.compute()["odsf"] == pytest.approx(75.0)
    assert 0.6 <= m.best_threshold() < 0.8
    wide = EdgeMetric(tolerance_px=2.0, from_logits=False)  # column 0 is now within tolerance
    wide.update(prob, gt)
    assert wide.compute()["odsf"] == pytest.approx(100.0)
    square = EdgeMetric(tolerance_px=1.0, metric="square", from_logits=False)
    square.update(prob, gt)
    # the square window also reaches diagonally: GT (3, 2) is found by the 0.8 at (2, 3); [.6, .8): R = 4/5
    assert square.compute()["odsf"] == pytest.approx(100 * 2 * 0.8 / 1.8)


def test_edge_mask_removes_predictions_and_gt():
    prob, gt = _edge_case()
    mask = torch.ones(1, 5, 5, dtype=torch.bool)
    mask[0, :, 0] = False  # hide the far column and ...
    mask[0, 3:, :] = False  # ... the rows where the prediction is weak
    m = EdgeMetric(tolerance_px=1.0, from_logits=False)
    m.update(prob, gt, mask)
    assert m.compute()["odsf"] == pytest.approx(100.0)


def test_edge_default_tolerance_is_seism_max_dist():
    assert EdgeMetric().tolerance(512, 512) == pytest.approx(0.0075 * math.hypot(512, 512))


@pytest.mark.parametrize("radius", [1.0, 1.5, 2.5])
def test_max_filter_matches_euclidean_distance_transform(radius):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 15) > 0.93
    ours = max_filter(x.float(), radius) > 0.5
    ref = np.stack([ndimage.distance_transform_edt(~b[0].numpy()) <= radius for b in x])
    assert np.array_equal(ours[:, 0].numpy(), ref)


def test_thin_edges_keeps_the_ridge():
    prob = torch.zeros(1, 1, 6, 7)
    prob[..., 2], prob[..., 3], prob[..., 4] = 0.5, 1.0, 0.5
    thin = thin_edges(prob)
    assert torch.equal(thin[..., 3], prob[..., 3]) and thin[..., [2, 4]].abs().sum() == 0


def test_classification_hand_case():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0]]).expand(4, 6)
    labels = torch.tensor([0, 5, 2, 0])  # hit top-1; miss both (lowest logit); top-5 only; masked
    target = torch.nn.functional.one_hot(labels, 6).float() * 0.7 + 0.05  # soft, same argmax
    m = ClassificationMetric()
    m.update(logits, target, torch.tensor([True, True, True, False]))
    out = m.compute()
    assert out["top1"] == pytest.approx(100 / 3) and out["top5"] == pytest.approx(200 / 3)


def _random_batch(name, b=3, h=10, w=12):
    spec = get_task(name)
    if spec.kind == "classification":
        return torch.randn(b, spec.channels), torch.softmax(torch.randn(b, spec.channels), -1), torch.rand(b) > 0.3
    mask = torch.rand(b, h, w) > 0.2
    if spec.kind == "segmentation":
        target = torch.randint(0, spec.channels, (b, h, w))
        target[torch.rand(b, h, w) > 0.9] = IGNORE_INDEX
    elif spec.kind in ("saliency", "edge"):
        target = (torch.rand(b, 1, h, w) > 0.8).float()
    elif spec.kind == "normal":
        target = torch.nn.functional.normalize(torch.randn(b, 3, h, w), dim=1)
    else:
        target = torch.randn(b, spec.channels, h, w)
    pred = torch.randn(b, spec.channels, h // 2, w // 2) if spec.is_dense else torch.randn(b, spec.channels)
    return pred, target, mask


def _close(a, b):
    assert set(a) == set(b)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), k


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_streams_reduces_and_round_trips(name):
    torch.manual_seed(1)
    p1, t1, m1 = _random_batch(name)
    p2, t2, m2 = _random_batch(name)
    spec = get_task(name)
    whole = build_metrics(spec)
    whole.update(torch.cat([p1, p2]), torch.cat([t1, t2]), torch.cat([m1, m2]))
    expected = whole.compute()
    assert set(expected) == set(spec.metrics)
    assert all(math.isfinite(v) for v in expected.values())

    streamed = build_metrics(spec)  # two updates == one update on the concatenated batch
    streamed.update(p1, t1, m1)
    streamed.update(p2, t2, m2)
    _close(streamed.compute(), expected)

    rank0, rank1 = build_metrics(spec), build_metrics(spec)  # DDP: sum of two ranks' states
    rank0.update(p1, t1, m1)
    rank1.update(p2, t2, m2)
    state = rank0.state()
    assert state.dtype == torch.float64 and state.dim() == 1
    rank0.sync(lambda s: s + rank1.state())
    _close(rank0.compute(), expected)

    restored = build_metrics(spec)
    restored.load_state(streamed.state())
    _close(restored.compute(), expected)
    restored.reset()
    assert all(math.isnan(v) for v in restored.compute().values())


def test_multitask_metrics_batch_forms_and_state():
    tasks = ["depth_euclidean", "normal", "segment_semantic"]
    torch.manual_seed(2)
    data = {t: _random_batch(t) for t in tasks}
    preds = {t: d[0] for t, d in data.items()}
    batch = {"image": torch.zeros(3, 3, 10, 12), "targets": {t: d[1] for t, d in data.items()},
             "masks": {t: d[2] for t, d in data.items()}}
    a = MultiTaskMetrics(tasks)
    a.update(preds, batch)
    b = MultiTaskMetrics(tasks)
    b.update(preds, batch["targets"], batch["masks"])
    out = a.compute()
    assert list(out) == tasks and out == b.compute()
    c = MultiTaskMetrics(tasks)
    c.load_state(a.state())
    assert c.compute() == out
    c.sync(lambda s: s * 2)  # doubling every count leaves ratios unchanged
    assert c.compute()["depth_euclidean"] == pytest.approx(out["depth_euclidean"])
    d = MultiTaskMetrics(tasks)
    d.update({"normal": preds["normal"]}, batch)  # subset forward: other tasks untouched
    assert math.isnan(d.compute()["depth_euclidean"]["l1"])


def test_delta_m_signs_and_mean():
    metrics = {"depth_euclidean": {"l1": 0.9, "rmse": 2.0}, "segment_semantic": {"miou": 40.0, "pixel_acc": 1}}
    baseline = {"depth_euclidean": {"l1": 1.0, "rmse": 2.0}, "segment_semantic": {"miou": 50.0, "pixel_acc": 1}}
    out = delta_m(metrics, baseline)
    assert out["depth_euclidean"] == pytest.approx(10.0)  # lower is better: -(0.9 - 1) / 1
    assert out["segment_semantic"] == pytest.approx(-20.0)  # (40 - 50) / 50
    assert out["mean"] == pytest.approx(-5.0)
    # single-task baselines: each task's own run results, or the bare primary value
    single = {"depth_euclidean": {"depth_euclidean": {"l1": 1.0}}, "segment_semantic": 50.0}
    assert delta_m(metrics, single) == pytest.approx(out)
    assert delta_m(metrics, baseline, tasks=["segment_semantic"]) == pytest.approx(
        {"segment_semantic": -20.0, "mean": -20.0})


def test_delta_m_uses_saliency_miou_as_primary():
    out = delta_m({"sal": {"maxf": 90.0, "miou": 66.0}}, {"sal": {"maxf": 10.0, "miou": 60.0}})
    assert out["sal"] == pytest.approx(10.0)


def test_delta_m_missing_task_names_it():
    with pytest.raises(UserError, match="normal"):
        delta_m({"normal": {"mean_angle": 20.0}}, {"depth_euclidean": {"l1": 1.0}})
    with pytest.raises(UserError, match="mean_angle"):
        delta_m({"normal": {"mean_angle": 20.0}}, {"normal": {"median_angle": 1.0}})


def test_delta_m_zero_baseline_is_named_or_skipped():
    """An untrained model's first eval often scores 0 mIoU: no relative change from 0 exists."""
    metrics = {"depth_euclidean": {"l1": 0.9}, "segment_semantic": {"miou": 12.0}}
    baseline = {"depth_euclidean": {"l1": 1.0}, "segment_semantic": {"miou": 0.0}}
    with pytest.raises(UserError, match="segment_semantic"):
        delta_m(metrics, baseline)
    out = delta_m(metrics, baseline, skip_zero_baselines=True)
    assert math.isnan(out["segment_semantic"]) and out["mean"] == pytest.approx(10.0)  # mean of the others
    assert zero_baseline_tasks(baseline, list(metrics)) == ["segment_semantic"]
    all_zero = delta_m(metrics, {t: {"l1": 0.0, "miou": 0.0} for t in metrics}, skip_zero_baselines=True)
    assert math.isnan(all_zero["mean"])


def test_segmentation_labels_of_no_class_are_misses_not_false_positives():
    target = torch.tensor([[[0, 0, 1, 2]]])
    labels = torch.tensor([[[0, 255, 1, 2]]])  # 255 predicted: a miss for class 0, no class gains a pixel
    m = SegmentationMetric(3)
    m.update(labels, target)
    # class 0: tp 1, fn 1 -> 1/2; classes 1, 2: 1 -> mean 5/6 (clamping 255 to class 2 would give 2/3)
    assert m.compute()["miou"] == pytest.approx(100 * 5 / 6)
    assert m.compute()["pixel_acc"] == pytest.approx(75.0)
    assert m.confusion().sum().item() == 3
