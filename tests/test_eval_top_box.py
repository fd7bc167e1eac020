"""TopBoxSpread: the spread across images of each image's top-scoring box (eval diagnostic)."""

from __future__ import annotations

import torch

from replic.engine.evaluate import TopBoxSpread


def _boxes(b: int, q: int) -> torch.Tensor:
    return torch.rand(b, q, 4, generator=torch.Generator().manual_seed(0))


def test_picks_the_top_scoring_query_of_each_image_focal():
    boxes = _boxes(3, 5)
    logits = torch.full((3, 5, 2), -5.0)
    best = [4, 0, 2]
    for i, q in enumerate(best):
        logits[i, q, 1] = 3.0
    spread = TopBoxSpread(focal=True)
    spread.update(logits, boxes)
    expected = torch.stack([boxes[i, q] for i, q in enumerate(best)]).double()
    assert torch.allclose(torch.tensor(spread.rows, dtype=torch.float64), expected)
    merged = TopBoxSpread.merged_std([spread.rows[:1], spread.rows[1:]])  # two processes
    assert abs(merged - float(expected.std(0).mean())) < 1e-12


def test_softmax_ignores_the_no_object_logit():
    boxes = _boxes(2, 3)
    logits = torch.zeros(2, 3, 3)  # 2 classes + no-object
    logits[:, 0, 2] = 10.0  # query 0: confident "no object" -> must not be the top detection
    logits[:, 1, 0] = 2.0   # query 1: the best real class score
    spread = TopBoxSpread(focal=False)
    spread.update(logits, boxes)
    assert torch.allclose(torch.tensor(spread.rows, dtype=torch.float64), boxes[:, 1].double())


def test_one_box_for_every_image_has_no_spread():
    boxes = _boxes(1, 4).expand(6, 4, 4)  # the box prior: the same boxes for every image
    fixed = TopBoxSpread(focal=True)
    logits = torch.full((6, 4, 3), -4.0)
    logits[:, 2, 0] = 4.0
    fixed.update(logits, boxes.clone())
    assert TopBoxSpread.merged_std([fixed.rows]) == 0.0
    assert TopBoxSpread.merged_std([fixed.rows[:1]]) is None  # one image: undefined
