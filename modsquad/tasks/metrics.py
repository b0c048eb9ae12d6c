"""Streaming evaluation metrics that reduce across DDP ranks, and the multi-task summary delta_m.

Each `Metric` keeps everything it needs as sums in ONE float64 vector (`state()`), so a distributed
evaluation is `metric.sync()` (an all_reduce SUM of that vector) followed by `compute()`, and two updates
give exactly what one update on the concatenated batch gives. Percentages (mIoU, accuracies, F-measures,
share of normals within an angle) are reported in 0-100 as in the papers' tables; errors in target units
(metres, degrees).

Batch layouts follow `tasks/registry.py` with a leading B dim. Dense predictions at another resolution than
the target are resized to it (bilinear on the head output) before scoring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..core.errors import UserError
from .losses import dense_mask, resize_to_target
from .registry import IGNORE_INDEX, TaskSpec, class_ids, get_task

ReduceFn = Callable[[Tensor], "Tensor | None"]


def all_reduce_sum(state: Tensor) -> Tensor:
    """Default `sync` reduction: SUM over torch.distributed ranks (identity when not distributed).

    NCCL only reduces CUDA tensors, so the vector visits the current CUDA device and comes back.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else state.device
    buf = state.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(state.device)


def _f64_device(t: Tensor | None) -> Tensor | None:
    """MPS has no float64: score those batches on the CPU."""
    return t.cpu() if t is not None and t.device.type == "mps" else t


def _div(a: Tensor, b: Tensor) -> Tensor:
    """a / b with 0 where b == 0 (e.g. precision at a threshold that predicts nothing)."""
    return torch.where(b > 0, a / b.clamp_min(1e-300), torch.zeros_like(a))


class Metric:
    """Base of all streaming metrics: `update` adds to float64 sums, `compute` turns them into numbers.

    Subclasses set `names` (the keys `compute` returns, equal to `TaskSpec.metrics` of the tasks they score)
    and the size of their accumulator vector.
    """

    names: tuple[str, ...] = ()

    def __init__(self, state_size: int):
        self._acc = torch.zeros(state_size, dtype=torch.float64)

    # --- streaming state ---
    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def reset(self) -> None:
        self._acc.zero_()

    @property
    def state_size(self) -> int:
        return self._acc.numel()

    def state(self) -> Tensor:
        """A copy of the accumulators: float64 [state_size]; summing states of two runs merges them."""
        return self._acc.detach().clone()

    def load_state(self, state: Tensor) -> None:
        state = torch.as_tensor(state, dtype=torch.float64).reshape(-1)
        if state.numel() != self.state_size:
            raise ValueError(f"{type(self).__name__}: state has {state.numel()} values, expected {self.state_size}")
        self._acc = state.detach().clone()

    def sync(self, reduce_fn: ReduceFn | None = None) -> None:
        """Replace the local sums by their sum over ranks; `reduce_fn` may reduce in place and return None."""
        state = self.state()
        out = (reduce_fn or all_reduce_sum)(state)
        self.load_state(state if out is None else out)

    def _accumulate(self, delta: Tensor) -> None:
        delta = _f64_device(delta.detach()).to(torch.float64)
        if self._acc.device != delta.device:
            self._acc = self._acc.to(delta.device)
        self._acc += delta

    def _sums(self) -> Tensor:
        return self._acc.cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.names)})"


class RegressionMetric(Metric):
    """L1 and RMSE pooled over every valid pixel and channel of the dataset (rmse = sqrt(mean sq. error)).

    pred, target: [B, C, H, W]; mask: bool [B, H, W]. State: [sum |e|, sum e^2, count].
    """

    names = ("l1", "rmse")

    def __init__(self):
        super().__init__(3)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        pred = resize_to_target(pred.float(), target.shape[-2:])
        valid = dense_mask(mask, target)[:, None].expand_as(target)
        err = (pred.double() - target.double())[valid]
        self._accumulate(torch.stack([err.abs().sum(), err.square().sum(), err.new_tensor(err.numel())]))

    def compute(self):
        s_abs, s_sq, n = self._sums().tolist()
        if n == 0:
            return {"l1": math.nan, "rmse": math.nan}
        return {"l1": s_abs / n, "rmse": math.sqrt(s_sq / n)}


class NormalMetric(Metric):
    """Angular error (degrees) between predicted and true normals over valid pixels.

    Mean and the shares within 11.25/22.5/30 deg are exact; the median comes from a histogram of
    `bin_width`-degree bins over [0, 180] (so it streams and reduces) and is the centre of the bin holding
    the ceil(n/2)-th smallest error: exact to within bin_width / 2 (0.005 deg by default).
    pred: [B, 3, H, W] (normalised here); target: [B, 3, H, W] unit vectors; mask: bool [B, H, W].
    State: [sum angle, count, n < 11.25, n < 22.5, n < 30, histogram...].
    """

    names = ("mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30")
    thresholds = (11.25, 22.5, 30.0)

    def __init__(self, bin_width: float = 0.01):
        self.bin_width = bin_width
        self.num_bins = math.ceil(180.0 / bin_width)
        super().__init__(2 + len(self.thresholds) + self.num_bins)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        pred = resize_to_target(pred.float(), target.shape[-2:]).double()
        cos = (F.normalize(pred, dim=1) * F.normalize(target.double(), dim=1)).sum(dim=1)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))[dense_mask(mask, target)]
        within = [(angle < t).sum() for t in self.thresholds]
        bins = (angle / self.bin_width).long().clamp_(0, self.num_bins - 1)
        hist = torch.bincount(bins, minlength=self.num_bins)
        head = torch.stack([angle.sum(), angle.new_tensor(angle.numel()), *within]).double()
        self._accumulate(torch.cat([head, hist.double()]))

    def compute(self):
        acc = self._sums()
        total, n = acc[0].item(), acc[1].item()
        if n == 0:
            return dict.fromkeys(self.names, math.nan)
        hist = acc[2 + len(self.thresholds):]
        k = math.ceil(n / 2)
        median_bin = int(torch.searchsorted(hist.cumsum(0), torch.tensor([float(k)], dtype=torch.float64)))
        out = {"mean_angle": total / n, "median_angle": (median_bin + 0.5) * self.bin_width}
        for t, c in zip(self.thresholds, acc[2:2 + len(self.thresholds)].tolist(), strict=True):
            out[f"within_{t:g}"] = 100.0 * c / n
        return out


class SegmentationMetric(Metric):
    """Confusion matrix -> mIoU and pixel accuracy.

    mIoU averages the IoU of every class that appears in the target OR the prediction over the whole
    evaluation (classes seen in neither are 0/0 and skipped; a class only ever predicted scores 0). On a
    full PASCAL/Taskonomy val set every class appears in GT, where this equals the benchmark mean over all
    classes. Classes below `first_label` are never targets (Taskonomy's segment_semantic: 0 = uncertain): logits
    are arg-maxed over the other channels and the mean leaves them out. A predicted label that is no class (below
    `first_label`, or outside 0..C-1) is a miss for the target's class and a false positive of none, as in the
    benchmark code. pred: logits [B, C, H, W] (argmax here) or labels long [B, H, W]; target: long [B, H, W]
    with `ignore_index` unlabelled; mask: optional bool [B, H, W]. State: confusion [C, C+1] flattened, rows =
    target, the last column counting predictions of no class.
    """

    names = ("miou", "pixel_acc")

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, first_label: int = 0):
        if not 0 <= first_label < num_classes:
            raise ValueError(f"first_label must be in [0, {num_classes}), got {first_label}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.first_label = first_label
        super().__init__(num_classes * (num_classes + 1))

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        target = target[:, 0] if target.dim() == 4 else target
        if pred.is_floating_point():
            labels = class_ids(resize_to_target(pred.float(), target.shape[-2:]), self.first_label, dim=1)
        else:
            labels = pred[:, 0] if pred.dim() == 4 else pred
            if labels.shape[-2:] != target.shape[-2:]:
                labels = F.interpolate(labels[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0]
            labels = labels.long()
        target = target.long()
        valid = (target != self.ignore_index) & (target >= self.first_label) & (target < self.num_classes)
        if mask is not None:
            valid &= dense_mask(mask, target)
        c = self.num_classes
        labels = labels[valid]
        labels = torch.where((labels >= self.first_label) & (labels < c), labels, c)  # no class: column C
        self._accumulate(torch.bincount(target[valid] * (c + 1) + labels, minlength=c * (c + 1)))

    def _table(self) -> Tensor:
        return self._sums().reshape(self.num_classes, self.num_classes + 1)

    def confusion(self) -> Tensor:
        """float64 [C, C]: rows are true classes, columns predicted classes (predictions of no class left out)."""
        return self._table()[:, :-1]

    def per_class_iou(self) -> Tensor:
        """float64 [C]: IoU in 0-1 per class, NaN for classes in neither target nor prediction and for classes
        below `first_label`."""
        table = self._table()
        tp = table.diag()
        union = table[:, :-1].sum(0) + table.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        iou[:self.first_label] = math.nan
        return iou

    def compute(self):
        table = self._table()
        total = table.sum().item()
        if total == 0:
            return {"miou": math.nan, "pixel_acc": math.nan}
        iou = self.per_class_iou()
        return {"miou": 100.0 * iou.nanmean().item(), "pixel_acc": 100.0 * table.diag().sum().item() / total}


def _reverse_cumsum(hist: Tensor) -> Tensor:
    """out[j] = sum(hist[j:]); with hist over bucketize(p, thresholds), out[k + 1] counts p > thresholds[k]."""
    return hist.flip(0).cumsum(0).flip(0)


def _threshold_hist(values: Tensor, thresholds: Tensor) -> Tensor:
    """Counts of `values` per interval between sorted thresholds: int64 [K + 1] (bin i: i thresholds < v)."""
    idx = torch.bucketize(values.double(), thresholds.to(values.device), right=False)
    return torch.bincount(idx, minlength=thresholds.numel() + 1)


def _default_thresholds() -> Tensor:
    return torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


def _f_measure(precision: Tensor, recall: Tensor, beta2: float) -> Tensor:
    return _div((1 + beta2) * precision * recall, beta2 * precision + recall)


def _probabilities(pred: Tensor, target_size, from_logits: bool) -> Tensor:
    """Binary head output [B, 1, h, w] -> probabilities [B, H, W] at the target size."""
    pred = resize_to_target(pred.float(), target_size)
    return (pred.sigmoid() if from_logits else pred)[:, 0]


class SaliencyMetric(Metric):
    """maxF and mIoU of binary saliency, each as in the papers that report it for PASCAL-Context.

    maxF (beta^2 = 0.3, the ATRC / InvPT convention) is the best F over `thresholds` (default 0.01..0.99) of
    dataset-level precision/recall, i.e. from TP/FP/FN counts summed over all images at each threshold (a pixel is
    salient when p > threshold). mIoU is the ASTMT / Multi-Task-Learning-PyTorch "maxmIoU" that MTL-PyTorch, M3ViT
    and Mod-Squad tables report: at each of `miou_thresholds` (default linspace(0.2, 0.9, 15)) the foreground IoU
    of every image (1 when target and prediction are both empty), averaged over images; the best threshold's
    mean. Masked pixels are left out; an image without valid pixels is skipped.
    pred: logits [B, 1, H, W] (probabilities if from_logits=False); target: [B, 1, H, W] in {0, 1};
    mask: bool [B, H, W]. State: [positives hist (K+1), negatives hist (K+1), IoU sum per miou threshold, images].
    """

    names = ("maxf", "miou")

    def __init__(self, thresholds: Sequence[float] | None = None, beta2: float = 0.3,
                 miou_thresholds: Sequence[float] | None = None, from_logits: bool = True):
        self.thresholds = (_default_thresholds() if thresholds is None
                           else torch.as_tensor(sorted(thresholds), dtype=torch.float64))
        self.miou_thresholds = torch.as_tensor(
            torch.linspace(0.2, 0.9, 15, dtype=torch.float64) if miou_thresholds is None else miou_thresholds,
            dtype=torch.float64).reshape(-1)
        self.beta2, self.from_logits = beta2, from_logits
        super().__init__(2 * (self.thresholds.numel() + 1) + self.miou_thresholds.numel() + 1)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        prob = _probabilities(pred, target.shape[-2:], self.from_logits)
        valid = dense_mask(mask, target)
        gt = target.reshape(prob.shape) > 0.5
        pos, neg = prob[valid & gt], prob[valid & ~gt]
        # per-image foreground IoU at each mIoU threshold: [B, M]
        prob, gt, valid = prob.flatten(1), (gt & valid).flatten(1), valid.flatten(1)
        ious = []
        for t in self.miou_thresholds.tolist():
            hit = (prob > t) & valid
            inter, union = (hit & gt).sum(1), (hit | gt).sum(1)
            ious.append(torch.where(union > 0, inter.double() / union.clamp_min(1), 1.0))
        labelled = valid.any(1)
        iou_sums = torch.stack(ious, 1)[labelled].sum(0)
        self._accumulate(torch.cat([_threshold_hist(pos, self.thresholds), _threshold_hist(neg, self.thresholds),
                                    iou_sums, labelled.sum().double().reshape(1)]))

    def compute(self):
        acc = self._sums()
        k1 = self.thresholds.numel() + 1
        pos_hist, neg_hist = acc[:k1], acc[k1:2 * k1]
        iou_sums, images = acc[2 * k1:-1], acc[-1].item()
        if images == 0:
            return {"maxf": math.nan, "miou": math.nan}
        tp_k = _reverse_cumsum(pos_hist)[1:]
        fp_k = _reverse_cumsum(neg_hist)[1:]
        precision = _div(tp_k, tp_k + fp_k)
        recall = _div(tp_k, pos_hist.sum().expand_as(tp_k))
        maxf = _f_measure(precision, recall, self.beta2).max().item()
        return {"maxf": 100.0 * maxf, "miou": 100.0 * (iou_sums / images).max().item()}


def max_filter(x: Tensor, radius: float, metric: str = "euclidean") -> Tensor:
    """Grey dilation: x [B, 1, H, W] -> max of x over a disk (euclidean) or square (chebyshev) of radius px.

    The disk is done row by row (one 1-D max-pool per row offset), so the cost grows with the radius, not
    its square. Outside the image counts as -inf.
    """
    r = int(math.floor(radius))
    if r <= 0:
        return x
    if metric == "square":
        return F.max_pool2d(x, 2 * r + 1, stride=1, padding=r)
    if metric != "euclidean":
        raise ValueError(f"metric must be 'euclidean' or 'square', got {metric!r}")
    h = x.shape[-2]
    out = torch.full_like(x, float("-inf"))
    rows: dict[int, Tensor] = {}
    for dy in range(-r, r + 1):
        if abs(dy) >= h:
            continue
        half = int(math.floor(math.sqrt(radius * radius - dy * dy) + 1e-9))
        if half not in rows:
            rows[half] = F.max_pool2d(x, (1, 2 * half + 1), stride=1, padding=(0, half)) if half else x
        row = rows[half]
        if dy >= 0:  # out[y] = max(out[y], row[y + dy])
            out[..., :h - dy, :] = torch.maximum(out[..., :h - dy, :], row[..., dy:, :])
        else:
            out[..., -dy:, :] = torch.maximum(out[..., -dy:, :], row[..., :h + dy, :])
    return out


def thin_edges(prob: Tensor) -> Tensor:
    """Canny-style non-maximum suppression: prob [B, 1, H, W] -> same, zero where a pixel is not a local
    maximum across the edge (gradient direction quantised to 0/45/90/135 degrees)."""
    sobel_x = prob.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]
    grad = F.conv2d(F.pad(prob, (1, 1, 1, 1), mode="replicate"), kernels)
    angle = torch.rad2deg(torch.atan2(grad[:, 1:2], grad[:, 0:1])) % 180.0
    direction = ((angle + 22.5) // 45.0).long() % 4  # 0: horizontal grad, 1: 45, 2: vertical, 3: 135
    padded = F.pad(prob, (1, 1, 1, 1), value=0.0)
    h, w = prob.shape[-2:]

    def shifted(dy: int, dx: int) -> Tensor:
        return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    keep = torch.zeros_like(prob, dtype=torch.bool)
    for d, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1)]):
        local_max = (prob >= shifted(dy, dx)) & (prob >= shifted(-dy, -dx))
        keep |= (direction == d) & local_max
    return torch.where(keep, prob, torch.zeros_like(prob))


class EdgeMetric(Metric):
    """ODS F-measure of edge maps with a pixel tolerance (a streaming re-implementation, not SEISM).

    At each threshold t of a fixed list (default 0.01..0.99) a pixel is an edge when p > t. Precision = share
    of predicted edge pixels with a GT edge within `tolerance_px`; recall = share of GT edge pixels with a
    predicted edge within `tolerance_px`; counts are summed over the dataset and ODS is the best F (beta = 1)
    over thresholds. Both sides are O(pixels) per batch for all thresholds at once: one dilation of the GT
    (precision) and one max-filter of p over the tolerance window (recall: a GT pixel is found at t iff the
    window's max p > t), binned by threshold.

    Differences from the MATLAB SEISM / BSDS tool used by PASCAL-MT papers: no one-to-one bipartite matching
    of predicted and GT pixels (correspondPixels), so a thick prediction can cover a GT pixel many times and
    scores higher; no morphological thinning of predictions unless `thin=True` (then a Canny-style NMS, not
    SEISM's thinning); the tolerance is a euclidean disk (or `metric="square"`) of `tolerance_px` pixels,
    by default 0.0075 x the image diagonal (SEISM's maxDist) at the target resolution; one GT per image.
    Numbers are comparable between runs of this code, not to published SEISM numbers.
    pred: logits [B, 1, H, W] (probabilities if from_logits=False); target: [B, 1, H, W] in {0, 1};
    mask: bool [B, H, W] (pixels outside count neither as prediction nor as GT).
    State: [predicted hist, predicted-near-GT hist, GT-found hist], each K + 1 bins.
    """

    names = ("odsf",)
    SEISM_MAX_DIST = 0.0075

    def __init__(self, tolerance_px: float | None = None, thresholds: Sequence[float] | None = None,
                 metric: str = "euclidean", thin: bool = False, from_logits: bool = True):
        self.tolerance_px, self.metric, self.thin, self.from_logits = tolerance_px, metric, thin, from_logits
        self.thresholds = (_default_thresholds() if thresholds is None
                           else torch.as_tensor(sorted(thresholds), dtype=torch.float64))
        super().__init__(3 * (self.thresholds.numel() + 1))

    def tolerance(self, height: int, width: int) -> float:
        if self.tolerance_px is not None:
            return float(self.tolerance_px)
        return self.SEISM_MAX_DIST * math.hypot(height, width)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        prob = _probabilities(pred, target.shape[-2:], self.from_logits)[:, None]
        if self.thin:
            prob = thin_edges(prob)
        valid = dense_mask(mask, target)[:, None]
        gt = (target.reshape(prob.shape) > 0.5) & valid
        tol = self.tolerance(*target.shape[-2:])
        near_gt = max_filter(gt.float(), tol, self.metric) > 0.5
        best_near = max_filter(torch.where(valid, prob, torch.full_like(prob, -1.0)), tol, self.metric)
        self._accumulate(torch.cat([_threshold_hist(prob[valid], self.thresholds),
                                    _threshold_hist(prob[valid & near_gt], self.thresholds),
                                    _threshold_hist(best_near[gt], self.thresholds)]))

    def compute(self):
        k1 = self.thresholds.numel() + 1
        acc = self._sums()
        pred_hist, tp_hist, gt_hist = acc[:k1], acc[k1:2 * k1], acc[2 * k1:]
        if pred_hist.sum() == 0:
            return {"odsf": math.nan}
        n_pred, n_tp = _reverse_cumsum(pred_hist)[1:], _reverse_cumsum(tp_hist)[1:]
        n_found = _reverse_cumsum(gt_hist)[1:]
        precision = _div(n_tp, n_pred)
        recall = _div(n_found, gt_hist.sum().expand_as(n_found))
        return {"odsf": 100.0 * _f_measure(precision, recall, 1.0).max().item()}

    def best_threshold(self) -> float:
        """The dataset-level (ODS) threshold behind `compute()['odsf']`."""
        k1 = self.thresholds.numel() + 1
        acc = self._sums()
        n_pred, n_tp = _reverse_cumsum(acc[:k1])[1:], _reverse_cumsum(acc[k1:2 * k1])[1:]
        n_found = _reverse_cumsum(acc[2 * k1:])[1:]
        f = _f_measure(_div(n_tp, n_pred), _div(n_found, acc[2 * k1:].sum().expand_as(n_found)), 1.0)
        return self.thresholds[int(f.argmax())].item()


class ClassificationMetric(Metric):
    """Top-1 / top-5 accuracy against the argmax of the soft target; masked samples are skipped.

    pred: logits [B, C]; target: probabilities [B, C] (or class ids [B]); mask: bool [B].
    State: [n correct top-1, n correct top-5, count].
    """

    names = ("top1", "top5")

    def __init__(self):
        super().__init__(3)

    @torch.no_grad()
    def update(self, pred, target, mask=None):
        pred, target, mask = _f64_device(pred), _f64_device(target), _f64_device(mask)
        label = target.argmax(dim=-1) if target.dim() == 2 else target.long()
        if mask is not None:
            keep = mask.reshape(-1).bool()
            pred, label = pred[keep], label[keep]
        top = pred.topk(min(5, pred.shape[-1]), dim=-1).indices
        hit = top == label[:, None]
        self._accumulate(torch.stack([hit[:, :1].any(-1).sum(), hit.any(-1).sum(),
                                      torch.tensor(label.numel(), device=hit.device)]))

    def compute(self):
        top1, top5, n = self._sums().tolist()
        if n == 0:
            return {"top1": math.nan, "top5": math.nan}
        return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


#: TaskSpec.kind -> builder(spec, **kwargs) -> Metric. A new kind of task is one entry here.
METRICS_BY_KIND: dict[str, Callable[..., Metric]] = {
    "regression": lambda spec, **kw: RegressionMetric(**kw),
    "normal": lambda spec, **kw: NormalMetric(**kw),
    "segmentation": lambda spec, **kw: SegmentationMetric(spec.channels, **{"first_label": spec.first_label, **kw}),
    "saliency": lambda spec, **kw: SaliencyMetric(**kw),
    "edge": lambda spec, **kw: EdgeMetric(**kw),
    "classification": lambda spec, **kw: ClassificationMetric(**kw),
}


def build_metrics(spec: TaskSpec | str, **kwargs) -> Metric:
    """The metric of a task, from its kind; kwargs go to the metric (e.g. `tolerance_px` for edges)."""
    spec = get_task(spec) if isinstance(spec, str) else spec
    return METRICS_BY_KIND[spec.kind](spec, **kwargs)


def _split_batch(batch: Mapping, masks: Mapping | None) -> tuple[Mapping, Mapping]:
    if "targets" in batch and isinstance(batch["targets"], Mapping):
        return batch["targets"], masks if masks is not None else (batch.get("masks") or {})
    return batch, masks or {}


class MultiTaskMetrics:
    """One streaming metric per task with a single flat state, so a DDP eval needs one all_reduce.

    `update(preds, batch)` takes the model output (task -> Tensor) and either a loader batch with
    `batch["targets"][task]` / `batch["masks"][task]`, or a dict task -> target with `masks` given apart.
    Tasks absent from `preds` are left untouched (a forward on a subset of tasks).
    """

    def __init__(self, tasks: Iterable[str | TaskSpec], metric_kwargs: Mapping[str, Mapping] | None = None):
        specs = [get_task(t) if isinstance(t, str) else t for t in tasks]
        self.specs = {s.name: s for s in specs}
        kw = metric_kwargs or {}
        self.metrics: dict[str, Metric] = {s.name: build_metrics(s, **kw.get(s.name, {})) for s in specs}

    def update(self, preds: Mapping[str, Tensor], batch: Mapping, masks: Mapping[str, Tensor] | None = None):
        targets, masks = _split_batch(batch, masks)
        for name, metric in self.metrics.items():
            if name not in preds:
                continue
            if name not in targets:
                raise KeyError(f"batch has no target for task {name!r}")
            metric.update(preds[name], targets[name], masks.get(name))

    def compute(self) -> dict[str, dict[str, float]]:
        return {name: m.compute() for name, m in self.metrics.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def state(self) -> Tensor:
        parts = [m.state() for m in self.metrics.values()]
        device = parts[0].device if parts else torch.device("cpu")
        return torch.cat([p.to(device) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)

    def load_state(self, state: Tensor) -> None:
        sizes = [m.state_size for m in self.metrics.values()]
        state = torch.as_tensor(state, dtype=torch.float64).reshape(-1)
        if state.numel() != sum(sizes):
            raise ValueError(f"state has {state.numel()} values, expected {sum(sizes)}")
        for m, part in zip(self.metrics.values(), state.split(sizes), strict=True):
            m.load_state(part)

    def sync(self, reduce_fn: ReduceFn | None = None) -> None:
        state = self.state()
        out = (reduce_fn or all_reduce_sum)(state)
        self.load_state(state if out is None else out)


def _metrics_of(source: Mapping, task: str) -> Mapping | float | None:
    """Metrics of `task` in a result dict: {task: {m: v}}, a single-task run's {task: {task: {m: v}}}, or a
    bare primary value {task: v}."""
    entry = source.get(task)
    if isinstance(entry, Mapping) and isinstance(entry.get(task), Mapping):
        entry = entry[task]
    return entry


def _primary_value(source: Mapping, task: str, spec: TaskSpec, what: str) -> float:
    entry = _metrics_of(source, task)
    if entry is None:
        raise UserError(f"{what} has no results for task {task!r} (has: {', '.join(map(str, source)) or 'none'})")
    if isinstance(entry, Mapping):
        if spec.primary not in entry:
            raise UserError(f"{what} for task {task!r} has no {spec.primary!r} metric "
                            f"(has: {', '.join(entry) or 'none'})")
        entry = entry[spec.primary]
    return float(entry)


def delta_m(metrics: Mapping, baseline: Mapping, tasks: Sequence[str] | None = None,
            skip_zero_baselines: bool = False) -> dict[str, float]:
    """Multi-task gain over a baseline, in percent, on each task's primary metric.

    delta_t = (-1)^{lower_is_better} (M_t - M_b,t) / M_b,t x 100, and "mean" = mean over tasks (positive =
    better than the baseline). `metrics` is {task: {metric: value}} (MultiTaskMetrics.compute or
    metrics.json); `baseline` is the same for one multi-task baseline run, or a dict task -> that task's
    single-task run results ({metric: v}, {task: {metric: v}}, or the bare primary value).

    A relative change from a baseline of 0 (or NaN) is undefined: by default that is a UserError naming the task;
    with `skip_zero_baselines` the task gets NaN and is left out of "mean" (the training run's own best-checkpoint
    score uses this, since an untrained model often scores 0 mIoU / F at its first evaluation).
    """
    tasks = list(tasks) if tasks is not None else [t for t in metrics if t != "mean"]
    out: dict[str, float] = {}
    counted: list[float] = []
    for task in tasks:
        spec = get_task(task)
        m = _primary_value(metrics, task, spec, "metrics")
        b = _primary_value(baseline, task, spec, "baseline")
        if b == 0 or not math.isfinite(b):
            if not skip_zero_baselines:
                raise UserError(f"baseline {spec.primary!r} of task {task!r} is {b}; delta_m needs a non-zero "
                                f"value")
            out[task] = math.nan
            continue
        sign = -1.0 if spec.lower_is_better() else 1.0
        out[task] = sign * (m - b) / b * 100.0
        counted.append(out[task])
    out["mean"] = sum(counted) / len(counted) if counted else math.nan
    return out


def zero_baseline_tasks(baseline: Mapping, tasks: Sequence[str]) -> list[str]:
    """Tasks whose primary metric in `baseline` is 0 or NaN (left out of delta_m's mean with skip_zero_baselines)."""
    out = []
    for task in tasks:
        b = _primary_value(baseline, task, get_task(task), "baseline")
        if b == 0 or not math.isfinite(b):
            out.append(task)
    return out
