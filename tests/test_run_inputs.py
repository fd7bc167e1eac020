"""A run's identity includes the content of the files it reads beside its config: a REAL training
is not continued after its training data (named by path only) was rewritten."""

from __future__ import annotations

import json
from pathlib import Path

from engine_testutil import make_uniform_coco, run, train_command


def test_rewritten_train_annotations_refuse_the_continuation_until_forced(tmp_path: Path) -> None:
    data = make_uniform_coco(tmp_path / "data", n_train=8, n_val=4)
    out = tmp_path / "run"
    command = train_command(out, data, ["train.epochs=1", "train.lr_drop=1"])
    first = run(command)
    assert first.returncode == 0, first.stderr[-3000:]
    recorded = json.loads((out / "inputs.json").read_text())
    key = "data.root (train annotations)"
    assert json.loads((out / "provenance.json").read_text())["inputs"] == recorded
    assert run(command).returncode == 0  # unchanged inputs: the finished run is kept

    # Same path, other content (one image fewer): the finished run was made from other data.
    ann = data / "annotations" / "instances_train2017.json"
    coco = json.loads(ann.read_text())
    dropped = coco["images"].pop()["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != dropped]
    ann.write_text(json.dumps(coco))
    refused = run(command)
    assert refused.returncode != 0
    assert f"{key} ({ann}): sha256 {recorded[key]['sha256'][:12]} ->" in refused.stderr
    assert "--force" in refused.stderr and (out / "done.json").is_file()  # nothing removed

    forced = run([*command, "--force"])
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert json.loads((out / "inputs.json").read_text())[key]["sha256"] != recorded[key]["sha256"]
