"""Time pycocotools vs faster-coco-eval on the same synthetic COCO-sized inputs.

Ground truth: N images (default 5,000, like val2017) with 1–15 boxes each over
80 non-contiguous category ids; detections: 100 per image (the GT boxes
jittered, the rest random false positives), fixed seed. Both backends score the
same in-memory inputs through ``replic.eval.score`` (validation and copying
included, as in real use); the script prints each time and AP.

    python benchmarks/bench_score.py [--images 5000] [--dets-per-image 100]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np


def build_inputs(num_images: int, dets_per_image: int, seed: int) -> tuple[dict, list[dict]]:
    """Synthetic COCO ground truth and matching noisy detections (JSON-ready)."""
    rng = np.random.default_rng(seed)
    # 80 ids out of 1..90, like COCO's gaps.
    cat_ids = sorted(rng.choice(np.arange(1, 91), size=80, replace=False).tolist())
    images, annotations, detections = [], [], []
    ann_id = 1
    for img_id in range(1, num_images + 1):
        width, height = 640, 480
        images.append({"id": img_id, "width": width, "height": height, "file_name": f"{img_id:012d}.jpg"})
        n_obj = int(rng.integers(1, 16))
        sides = np.exp(rng.uniform(np.log(8), np.log(400), size=(n_obj, 2)))
        w = np.minimum(sides[:, 0], width - 1)
        h = np.minimum(sides[:, 1], height - 1)
        x = rng.uniform(0, width - w)
        y = rng.uniform(0, height - h)
        cats = rng.choice(cat_ids, size=n_obj)
        for k in range(n_obj):
            box = [float(x[k]), float(y[k]), float(w[k]), float(h[k])]
            annotations.append({
                "id": ann_id, "image_id": img_id, "category_id": int(cats[k]), "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0,
            })  # fmt: skip
            ann_id += 1
            jit = rng.normal(0, 0.1, size=4)
            detections.append({
                "image_id": img_id, "category_id": int(cats[k]),
                "bbox": [box[0] + jit[0] * box[2], box[1] + jit[1] * box[3],
                         box[2] * math.exp(jit[2]), box[3] * math.exp(jit[3])],
                "score": float(rng.uniform(0.3, 1.0)),
            })  # fmt: skip
        n_fp = dets_per_image - n_obj
        fw = rng.uniform(4, 300, size=n_fp)
        fh = rng.uniform(4, 300, size=n_fp)
        fx = rng.uniform(0, width - fw)
        fy = rng.uniform(0, height - fh)
        fcat = rng.choice(cat_ids, size=n_fp)
        fscore = rng.uniform(0.0, 0.8, size=n_fp)
        for k in range(n_fp):
            detections.append({
                "image_id": img_id, "category_id": int(fcat[k]),
                "bbox": [float(fx[k]), float(fy[k]), float(fw[k]), float(fh[k])],
                "score": float(fscore[k]),
            })  # fmt: skip
    categories = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in cat_ids]
    gt = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    return gt, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from importlib.metadata import version

    from replic.eval import METRIC_NAMES, score

    t0 = time.perf_counter()
    gt, dets = build_inputs(args.images, args.dets_per_image, args.seed)
    print(f"inputs: {len(gt['images'])} images, {len(gt['annotations'])} GT boxes, "
          f"{len(dets)} detections (built in {time.perf_counter() - t0:.1f}s)")  # fmt: skip
    print(f"python {platform.python_version()}, pycocotools {version('pycocotools')}, "
          f"faster-coco-eval {version('faster-coco-eval')}, numpy {np.__version__}")  # fmt: skip

    results = {}
    for backend in ("pycocotools", "faster-coco-eval"):
        t0 = time.perf_counter()
        results[backend] = score(gt, dets, backend=backend)
        elapsed = time.perf_counter() - t0
        print(f"{backend:>17}: {elapsed:7.2f} s   AP {results[backend]['AP']:.6f}   "
              f"AP50 {results[backend]['AP50']:.6f}   AR100 {results[backend]['AR100']:.6f}")  # fmt: skip
        results[backend]["_seconds"] = elapsed

    ref, fast = results["pycocotools"], results["faster-coco-eval"]
    diff = max(abs(ref[k] - fast[k]) for k in METRIC_NAMES if not math.isnan(ref[k]))
    print(f"speed-up: {ref['_seconds'] / fast['_seconds']:.1f}x   max |metric difference| over 12 metrics: {diff:.3g}")


if __name__ == "__main__":
    main()
