"""A paired bootstrap of COCO AP over the validation images.

A verdict such as "row A beats row B" needs an interval, and one source of noise is the finite
set of val images. Matching detections to ground truth (pycocotools' ``COCOeval.evaluate``) is
the slow part and does not depend on which images a resample draws, so each run is evaluated
once (:class:`ImageEvaluation`); a resample (a count per image: 0, 1, 2, ... draws) is then
scored by re-accumulating AP from the stored per-image records, in milliseconds.

The re-accumulation mirrors ``COCOeval.accumulate`` + ``summarize`` exactly (area "all",
100 detections per image): with every image drawn once, ``metric("AP")`` equals
``COCOeval.stats[0]`` (and AP50/AP75 ``stats[1]``/``stats[2]``) bit for bit in the tests.
An image drawn ``c`` times counts as ``c`` physical copies of it, each scored as its own image
and ordered right after the original (what pycocotools does when the copies get image ids
between the original's and the next image's). The order matters only for detections of
equal score: pycocotools ranks them with a stable sort, by image and then by their order
within the image.

:func:`paired_bootstrap` applies the same resamples to two runs and collects AP_A - AP_B;
:func:`resampled_metrics` gives each run's metric under shared resamples (for averages over
seeds per resample).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from replic.eval.coco_eval import load_detections, load_ground_truth, pycocotools_evaluator

# Metric name -> IoU threshold of pycocotools' summarize (None: the mean over .50:.95).
BOOTSTRAP_METRICS: dict[str, float | None] = {"AP": None, "AP50": 0.5, "AP75": 0.75}


def _exclusive_cumsum(values: np.ndarray) -> np.ndarray:
    out = np.cumsum(values)
    out -= values
    return out


def _block_starts(keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal consecutive ``keys`` begins."""
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def _repeat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - _exclusive_cumsum(lengths), lengths)
    return offsets + np.arange(total, dtype=np.int64)


def min_true_positives(npig: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """``[k, r]``: the least true-positive count ``x`` with ``x / npig[k] >= rec_thrs[r]``.

    pycocotools finds the precision sample of recall threshold ``r`` with
    ``searchsorted(tp / npig, rec_thrs, side="left")``; since ``tp`` counts up in steps of one,
    that is the first detection where ``tp`` reaches this ``x``. The float division is the
    one pycocotools does, so a threshold that lands exactly on a recall value is treated alike.
    Rows with ``npig == 0`` are 0 (pycocotools skips those categories).
    """
    n = np.maximum(npig, 1).astype(np.float64)[:, None]
    thr = np.asarray(rec_thrs, dtype=np.float64)[None, :]
    x = np.ceil(thr * n)
    while True:  # ceil(thr * n) can be one off after rounding; step to the exact boundary
        down = (x > 0) & ((x - 1) / n >= thr)
        up = x / n < thr
        if not (down.any() or up.any()):
            break
        x = x - down + up
    x[npig == 0] = 0
    return x.astype(np.int64)


class ImageEvaluation:
    """One run's per-image COCO matching records, re-accumulated into AP for any image multiset.

    Built once from ground truth and detections (paths or loaded objects, validated like
    :func:`replic.eval.coco_eval.score`) by running pycocotools' ``evaluate``; keeps, for every
    (category, image) at area "all" and 100 detections, what ``accumulate`` reads: detection
    scores, per-IoU-threshold match and ignore flags, and the number of non-ignored objects.

    Attributes:
        image_ids: the ground truth's image ids, sorted (pycocotools' order); ``image_counts``
            arguments are indexed like this list.
        category_ids: the ground truth's category ids, sorted.
    """

    image_ids: list[int]
    category_ids: list[int]

    def __init__(
        self,
        gt: str | os.PathLike | Mapping[str, Any],
        detections: str | os.PathLike | Sequence[Mapping[str, Any]],
    ) -> None:
        gt_dataset, gt_source = load_ground_truth(gt)
        dets, _ = load_detections(detections, gt_dataset, gt_source)
        # evaluate() is the only part we need; the accumulate() pycocotools_evaluator adds is cheap.
        self._build(pycocotools_evaluator(gt_dataset, dets))

    @classmethod
    def from_cocoeval(cls, evaluator: Any) -> ImageEvaluation:
        """Wrap a pycocotools ``COCOeval`` (bbox, ``useCats=1``, default params) after ``evaluate()``."""
        self = cls.__new__(cls)
        self._build(evaluator)
        return self

    def _build(self, evaluator: Any) -> None:
        p = evaluator.params
        if not p.useCats:
            raise ValueError("ImageEvaluation needs a per-category evaluation (useCats=1)")
        if not evaluator.evalImgs:
            raise ValueError("the COCOeval has no per-image records; call evaluate() first")
        self.image_ids = [int(i) for i in p.imgIds]
        self.category_ids = [int(k) for k in p.catIds]
        self._iou_thrs = np.asarray(p.iouThrs, dtype=np.float64)
        self._rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
        num_t, num_k, num_i = len(p.iouThrs), len(p.catIds), len(p.imgIds)
        area_all = list(p.areaRngLbl).index("all")
        max_det = 100
        if max_det not in p.maxDets:
            raise ValueError(f"the COCOeval's maxDets {p.maxDets} lack 100")

        # Per category, the detections in the order accumulate() ranks them with every image once:
        # images in id order, each image's detections as evaluateImg sorted them, then a stable
        # sort by descending score. Categories are concatenated (category-major).
        npig = np.zeros((num_k, num_i), dtype=np.int64)
        scores, images, cats, tps, igs = [], [], [], [], []
        for k in range(num_k):
            base = k * len(p.areaRng) * num_i + area_all * num_i
            records = [(i, evaluator.evalImgs[base + i]) for i in range(num_i)]
            records = [(i, e) for i, e in records if e is not None]
            if not records:
                continue
            for i, e in records:
                npig[k, i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            k_scores = np.concatenate([e["dtScores"][0:max_det] for _, e in records]).astype(np.float64)
            k_images = np.concatenate([np.full(len(e["dtScores"][0:max_det]), i, dtype=np.int64)
                                       for i, e in records])
            matched = np.concatenate([e["dtMatches"][:, 0:max_det] for _, e in records], axis=1)
            ignored = np.concatenate([e["dtIgnore"][:, 0:max_det] for _, e in records], axis=1)
            order = np.argsort(-k_scores, kind="mergesort")
            scores.append(k_scores[order])
            images.append(k_images[order])
            cats.append(np.full(order.size, k, dtype=np.int64))
            ignored = np.asarray(ignored, dtype=bool)[:, order]
            # A match to a crowd (ignored) object is neither a true nor a false positive.
            tps.append(np.logical_and(matched[:, order], ~ignored))
            igs.append(ignored)
        det_score = np.concatenate(scores) if scores else np.zeros(0)
        det_image = np.concatenate(images) if images else np.zeros(0, dtype=np.int64)
        det_cat = np.concatenate(cats) if cats else np.zeros(0, dtype=np.int64)
        det_tp = np.concatenate(tps, axis=1) if tps else np.zeros((num_t, 0), dtype=bool)
        det_ig = np.concatenate(igs, axis=1) if igs else np.zeros((num_t, 0), dtype=bool)
        det_fp = ~det_tp & ~det_ig

        # A "unit" is a run of equal-score detections of one image and category (almost always a
        # single detection). Drawn c times, a unit's detections appear as c consecutive copies of
        # the run (copy 1: d1 d2 ..., copy 2: d1 d2 ...), because the copies are separate images.
        new_unit = np.ones(det_score.size, dtype=bool)
        if det_score.size:
            new_unit[1:] = ((det_score[1:] != det_score[:-1]) | (det_image[1:] != det_image[:-1])
                            | (det_cat[1:] != det_cat[:-1]))
        unit_of_det = np.cumsum(new_unit) - 1
        unit_first = np.flatnonzero(new_unit)
        num_u = unit_first.size
        unit_cat = det_cat[unit_first]
        unit_size = np.bincount(unit_of_det, minlength=num_u).astype(np.int64)
        # Exclusive cumulative sums restart at each category: the first unit of each unit's category.
        cat_first_unit = np.zeros(num_k, dtype=np.int64)
        present, first_index = np.unique(unit_cat, return_index=True)
        cat_first_unit[present] = first_index

        def per_unit(flags: np.ndarray) -> np.ndarray:  # [T, U] counts of flagged detections
            out = np.zeros((num_t, num_u), dtype=np.int64)
            for t in range(num_t):
                out[t] = np.bincount(unit_of_det, weights=flags[t], minlength=num_u)
            return out

        unit_tp, unit_ig = per_unit(det_tp), per_unit(det_ig)
        unit_fp = unit_size[None, :] - unit_tp - unit_ig

        # Units with a true positive or an ignored detection at threshold t (sparse: most
        # detections are false positives at every threshold), in (t, category, rank) order.
        nf_t, nf_u = np.nonzero(unit_tp + unit_ig)
        nf_seg = nf_t * num_k + unit_cat[nf_u]
        seg_first = _block_starts(nf_seg)
        nf_seg_first = np.repeat(seg_first, np.diff(np.append(seg_first, nf_seg.size)))
        # Of those, the units with a true positive: where precision/recall points are made.
        tpu = np.flatnonzero(unit_tp[nf_t, nf_u] > 0)

        # Every true positive at threshold t, in the same order, with its position inside its unit.
        ev_t, ev_det = np.nonzero(det_tp)
        tp_cum = np.cumsum(det_tp, axis=1)
        fp_cum = np.cumsum(det_fp, axis=1)
        before = unit_first[unit_of_det[ev_det]] - 1  # last detection before the unit, per event
        has_before = before >= 0
        before = np.maximum(before, 0)
        ev_tp_in_unit = tp_cum[ev_t, ev_det] - np.where(has_before, tp_cum[ev_t, before], 0)
        ev_fp_in_unit = fp_cum[ev_t, ev_det] - np.where(has_before, fp_cum[ev_t, before], 0)

        self._num_t, self._num_k, self._num_i = num_t, num_k, num_i
        self._npig = npig
        self._unit_image = det_image[unit_first]
        self._unit_cat = unit_cat
        self._unit_size = unit_size
        self._cat_first_unit = cat_first_unit
        self._nf_u, self._nf_seg_first = nf_u, nf_seg_first
        self._nf_tp = unit_tp[nf_t, nf_u]
        self._nf_nonfp = self._nf_tp + unit_ig[nf_t, nf_u]
        self._tpu = tpu
        self._tpu_seg = nf_seg[tpu]
        self._tpu_unit = nf_u[tpu]
        self._tpu_tp = unit_tp[nf_t[tpu], nf_u[tpu]]
        self._tpu_fp = unit_fp[nf_t[tpu], nf_u[tpu]]
        self._tpu_event_start = _exclusive_cumsum(self._tpu_tp)
        self._ev_tp_in_unit = ev_tp_in_unit.astype(np.int64)
        self._ev_fp_in_unit = ev_fp_in_unit.astype(np.int64)

    def _counts(self, image_counts: np.ndarray | None) -> np.ndarray:
        if image_counts is None:
            return np.ones(self._num_i, dtype=np.int64)
        counts = np.asarray(image_counts)
        if counts.shape != (self._num_i,):
            raise ValueError(f"image_counts must have shape ({self._num_i},) (one count per image id), "
                             f"got {counts.shape}")
        if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
            raise ValueError("image_counts must be non-negative integers")
        return counts.astype(np.int64)

    def precision(self, image_counts: np.ndarray | None = None) -> np.ndarray:
        """pycocotools' ``eval["precision"][:, :, :, area "all", maxDets 100]`` for a resample.

        Shape ``[T, R, K]`` (IoU thresholds, recall thresholds, categories); -1 for a category
        without a non-ignored object among the drawn images.
        """
        counts = self._counts(image_counts)
        num_t, num_k = self._num_t, self._num_k
        num_r = self._rec_thrs.size
        npig = self._npig @ counts
        valid = npig > 0

        # Detections (weighted by draws) ranked before each unit, per category.
        unit_draws = counts[self._unit_image]
        unit_weight = unit_draws * self._unit_size
        dets_before = _exclusive_cumsum(unit_weight)
        dets_before -= dets_before[self._cat_first_unit[self._unit_cat]]
        # True positives and non-false-positives ranked before each sparse unit, per (t, category).
        nf_draws = unit_draws[self._nf_u]
        tp_w = nf_draws * self._nf_tp
        nonfp_w = nf_draws * self._nf_nonfp
        tp_before = _exclusive_cumsum(tp_w)
        tp_before -= tp_before[self._nf_seg_first]
        nonfp_before = _exclusive_cumsum(nonfp_w)
        nonfp_before -= nonfp_before[self._nf_seg_first]

        tpu = self._tpu
        tpu_tp_before = tp_before[tpu]
        tpu_fp_before = dets_before[self._tpu_unit] - nonfp_before[tpu]
        draws = nf_draws[tpu]

        # One precision/recall point per true positive per drawn copy of its unit:
        # copy j (0-based) follows j full copies of the unit.
        copy_unit = np.repeat(np.arange(tpu.size), draws)
        copy_index = np.arange(copy_unit.size) - np.repeat(_exclusive_cumsum(draws), draws)
        per_copy = self._tpu_tp[copy_unit]
        ev_copy = np.repeat(np.arange(copy_unit.size), per_copy)
        ev_base = _repeat_ranges(self._tpu_event_start[copy_unit], per_copy)
        ev_unit = copy_unit[ev_copy]
        ev_j = copy_index[ev_copy]
        tp = tpu_tp_before[ev_unit] + ev_j * self._tpu_tp[ev_unit] + self._ev_tp_in_unit[ev_base]
        fp = tpu_fp_before[ev_unit] + ev_j * self._tpu_fp[ev_unit] + self._ev_fp_in_unit[ev_base]
        tp_f = tp.astype(np.float64)
        pr = tp_f / (fp.astype(np.float64) + tp_f + np.spacing(1))  # the same float ops as pycocotools

        # Recall threshold r samples the precision envelope max(pr[i:]) at the first detection i
        # reaching x[k, r] true positives, or 0 past the last detection. The envelope's maximum
        # sits on a true positive (precision only drops on false positives, and an ignored
        # detection repeats its predecessor's value), so q[r] = max pr over points with tp >= x[r].
        x = min_true_positives(npig, self._rec_thrs)
        stride = int(x.max(initial=0)) + int(tp.max(initial=0)) + 1
        ev_seg = self._tpu_seg[ev_unit]
        ev_k = ev_seg % num_k
        x_key = (x + np.arange(num_k)[:, None] * stride).ravel()
        ev_r = np.searchsorted(x_key, tp + ev_k * stride, side="right") - 1 - ev_k * num_r
        q = np.zeros(num_t * num_k * num_r)
        if pr.size:
            cell = ev_seg * num_r + ev_r  # non-decreasing: points come in (t, k, rank) order
            first = _block_starts(cell)
            q[cell[first]] = np.maximum.reduceat(pr, first)
        q = q.reshape(num_t, num_k, num_r)
        q = np.maximum.accumulate(q[:, :, ::-1], axis=2)[:, :, ::-1]
        q[:, ~valid, :] = -1.0  # pycocotools' marker for a category without objects
        return np.ascontiguousarray(q.transpose(0, 2, 1))

    def metric(self, name: str = "AP", image_counts: np.ndarray | None = None) -> float:
        """AP (IoU .50:.95), AP50 or AP75 for the images drawn ``image_counts[i]`` times each.

        ``image_counts[i]`` counts ``image_ids[i]``; None draws every image once, which gives
        pycocotools' ``stats``. A fraction, or -1 when no drawn image has a non-ignored object.
        """
        iou_thr = _metric_iou(name)
        return self._summarize(self.precision(image_counts), iou_thr)

    def _summarize(self, precision: np.ndarray, iou_thr: float | None) -> float:
        # summarize()'s reduction, element order included: mean over the (t, r, k) cells > -1.
        s = precision
        if iou_thr is not None:
            s = s[np.where(iou_thr == self._iou_thrs)[0]]
        kept = s[s > -1]
        return -1.0 if kept.size == 0 else float(np.mean(kept))


def _metric_iou(name: str) -> float | None:
    if name not in BOOTSTRAP_METRICS:
        raise ValueError(f"unknown bootstrap metric {name!r}; choose one of {list(BOOTSTRAP_METRICS)}")
    return BOOTSTRAP_METRICS[name]


def _check_same_images(evaluations: Sequence[ImageEvaluation]) -> list[int]:
    first = evaluations[0].image_ids
    for n, ev in enumerate(evaluations[1:], start=1):
        if ev.image_ids != first:
            only_first = sorted(set(first) - set(ev.image_ids))
            only_other = sorted(set(ev.image_ids) - set(first))
            raise ValueError(
                f"evaluations 0 and {n} are over different images ({len(first)} vs {len(ev.image_ids)}): "
                f"{len(only_first)} only in 0 (first: {only_first[:5]}), "
                f"{len(only_other)} only in {n} (first: {only_other[:5]})"
            )
    return first


def resample_counts(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``[resamples, num_images]`` draw counts: each row draws ``num_images`` images with replacement."""
    rng = np.random.default_rng(seed)
    counts = np.empty((resamples, num_images), dtype=np.int64)
    for b in range(resamples):
        counts[b] = np.bincount(rng.integers(0, num_images, size=num_images), minlength=num_images)
    return counts


def resampled_metrics(
    evaluations: Sequence[ImageEvaluation],
    metric: str = "AP",
    resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Each run's ``metric`` under the same bootstrap resamples of the images.

    Returns ``[len(evaluations), resamples]``; column ``b`` scores every run on resample ``b``,
    so differences (or averages over seeds) can be taken per resample. The runs must share
    their image ids (ValueError otherwise).
    """
    if not evaluations:
        raise ValueError("resampled_metrics needs at least one evaluation")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    iou_thr = _metric_iou(metric)
    image_ids = _check_same_images(evaluations)
    counts = resample_counts(len(image_ids), resamples, seed)
    out = np.empty((len(evaluations), resamples))
    for b in range(resamples):
        for n, ev in enumerate(evaluations):
            out[n, b] = ev._summarize(ev.precision(counts[b]), iou_thr)
    return out


@dataclass(frozen=True, eq=False)
class BootstrapResult:
    """A paired bootstrap of ``metric`` A - B: the full-set difference and one per resample."""

    metric: str
    observed: float
    samples: np.ndarray

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The percentile interval holding ``level`` of the resampled differences."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        tail = 100.0 * (1.0 - level) / 2.0
        low, high = np.percentile(self.samples, [tail, 100.0 - tail])
        return float(low), float(high)

    @property
    def sd(self) -> float:
        """Standard deviation of the resampled differences (the bootstrap standard error)."""
        return float(np.std(self.samples, ddof=1)) if self.samples.size > 1 else 0.0


def paired_bootstrap(
    a: ImageEvaluation,
    b: ImageEvaluation,
    metric: str = "AP",
    resamples: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap ``metric(a) - metric(b)`` over the images, both runs on the same resamples.

    Pairing removes the noise the two runs share (hard and easy images), which is most of it.
    """
    values = resampled_metrics([a, b], metric=metric, resamples=resamples, seed=seed)
    samples = values[0] - values[1]
    samples.setflags(write=False)
    return BootstrapResult(metric=metric, observed=a.metric(metric) - b.metric(metric), samples=samples)
