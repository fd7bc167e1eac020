"""Receptive-token figures of a MasKD token run: what each token looks at, how much it weighs, how
different the tokens are (the notebook notebooks/receptive_tokens.ipynb and the workflow rule use it).

A token run's ``checkpoint_final.pt`` (a ``maskd_tokens`` experiment) holds everything: the teacher's
weights (``model``, unchanged by stage 1), its ``model_config``, the resolved run ``config`` (data
root, method options) and the tokens (``method``). For a few val images and one level it draws:

* ``masks_<level>.png``: each image, then its T masks ``sigmoid(token_t · x)`` with the weight p_t;
* ``dice_<level>.png``: the pairwise Dice coefficient between the tokens' masks (mean over images;
  the diagonal is 1 by definition, off-diagonal values near 0 mean the tokens are diverse);
* ``summary.json``: per level, the mean p_t, the mean mask value per token and the Dice matrix.

``python -m replic.viz.receptive_tokens --checkpoint RUN/checkpoint_final.pt --out DIR [--images @0 @1]
[--level P3] [--data-root ROOT]``; ``… collect OUT.json SUMMARY.json...`` (index of a table's token runs);
``… ap-vs-tokens TABLE.csv OUT.png EXPERIMENTS_DIR [SCALE]`` (AP against T).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from replic.methods.maskd import TokenBank, load_tokens, tap_features, tap_module, token_state


@dataclass
class TokenRun:
    """A token run loaded for figures: the teacher, its tokens, the data config, the options."""

    detector: nn.Module
    tokens: TokenBank
    data_config: Any
    position: str
    levels: list[str]
    path: Path


def load_token_run(checkpoint: str | Path, data_root: str | None = None) -> TokenRun:
    """The teacher detector and tokens of a ``maskd_tokens`` run checkpoint (CPU, eval mode)."""
    from replic.config import from_dict
    from replic.data.config import DataConfig
    from replic.engine.checkpoint import load_checkpoint
    from replic.models.families import family_of

    path = Path(checkpoint)
    data = load_checkpoint(path)
    config = data.get("config") or {}
    method = config.get("method") or {}
    if method.get("name") != "maskd_tokens":
        raise ValueError(f"{path}: not a MasKD token run (method.name is {method.get('name')!r}, "
                         "expected 'maskd_tokens')")
    from replic.distill.teacher import _model_schema

    model_cfg = from_dict(_model_schema(data["model_config"]), data["model_config"], prefix="model_config")
    detector = family_of(model_cfg).build_model(dataclasses.replace(model_cfg, pretrained_backbone="none"))
    detector.load_state_dict(data["model"], strict=True)
    detector.eval()
    position = method.get("position", "fpn")
    with torch.no_grad():
        probe = tap_module(detector, position)(torch.zeros(1, 3, 64, 64))
    state, _ = token_state(path)
    num_tokens = int(state["mask_modules.0.mask_token"].shape[0])
    bank = TokenBank([int(v.shape[1]) for v in probe.values()], num_tokens, any(".prob." in k for k in state))
    load_tokens(bank, state, path)
    data_cfg = from_dict(DataConfig, dict(config["data"]), prefix="data")
    if data_root:
        data_cfg = dataclasses.replace(data_cfg, root=str(data_root))
    if position == "fpn":
        levels = list(model_cfg.levels)
    elif getattr(model_cfg, "family", "detr") == "cnn":  # torchvision body keys "0", "1", ... → C-levels
        levels = [f"C{i + 5 - len(probe)}" for i in range(1, len(probe) + 1)]
    else:
        levels = list(probe)  # DETR: already "C5" (…)
    return TokenRun(detector, bank.eval(), data_cfg, position, levels, path)


@torch.no_grad()
def token_maps(run: TokenRun, images: Tensor, mask: Tensor) -> dict[str, dict[str, Tensor]]:
    """Per level: ``masks`` (N, T, h, w), ``weights`` (N, T) and the image sizes on that grid."""
    feats = tap_features(run.detector, images, mask, run.position)
    out = {}
    for level, x, tokens in zip(run.levels, feats, run.tokens.mask_modules, strict=True):
        out[level] = {"masks": tokens.masks(x), "weights": tokens.weights(x)}
    return out


def pairwise_dice(masks: Tensor, eps: float = 1e-12) -> Tensor:
    """(N, T, H, W) → (T, T) Dice coefficient between every pair of token masks, mean over images."""
    flat = masks.flatten(2)
    inter = flat @ flat.transpose(1, 2)
    sq = (flat * flat).sum(-1) + eps
    return (2 * inter / (sq[:, :, None] + sq[:, None, :])).mean(0)


def _crop(mask_map: Tensor, image_hw: tuple[int, int], padded_hw: tuple[int, int]) -> np.ndarray:
    """The part of a level's map that covers the (unpadded) image."""
    h = max(1, round(mask_map.shape[-2] * image_hw[0] / padded_hw[0]))
    w = max(1, round(mask_map.shape[-1] * image_hw[1] / padded_hw[1]))
    return mask_map[:h, :w].cpu().numpy()


def plot_masks(originals: list[np.ndarray], maps: dict[str, Tensor], level: str, sizes: list[tuple[int, int]],
               padded: tuple[int, int]):
    """Rows: images; columns: the image, then each token's mask on it, titled with p_t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks, weights = maps["masks"], maps["weights"]
    n, t = masks.shape[:2]
    fig, axes = plt.subplots(n, t + 1, figsize=(1.8 * (t + 1), 1.9 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(originals[i])
        axes[i, 0].set_title("image", fontsize=8)
        for k in range(t):
            ax = axes[i, k + 1]
            ax.imshow(_crop(masks[i, k], sizes[i], padded), vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"token {k}  p={float(weights[i, k]):.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"receptive-token masks, level {level}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_dice(dice: Tensor, level: str):
    """The T×T pairwise Dice matrix as a heatmap with its values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = dice.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * t, 0.8 + 0.5 * t))
    ax.imshow(dice.numpy(), vmin=0.0, vmax=1.0, cmap="magma")
    for i in range(t):
        for j in range(t):
            ax.text(j, i, f"{float(dice[i, j]):.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dice[i, j] < 0.6 else "black")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    ax.set_title(f"pairwise Dice, level {level}", fontsize=9)
    fig.tight_layout()
    return fig


def render(checkpoint: str | Path, out_dir: str | Path, images: list[str] | None = None,
           levels: list[str] | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Write the figures and ``summary.json`` of a token run into ``out_dir``; return the summary."""
    import matplotlib.pyplot as plt

    from replic.io import atomic_write_json
    from replic.viz.loading import load_images
    from replic.viz.plots import save_figure

    run = load_token_run(checkpoint, data_root)
    batch = load_images(images or ["@0", "@1", "@2"], run.data_config)
    maps = token_maps(run, batch.images, batch.mask)
    sizes = [tuple(int(v) for v in t["size"]) for t in batch.targets]
    padded = (int(batch.images.shape[-2]), int(batch.images.shape[-1]))
    out = Path(out_dir)
    summary: dict[str, Any] = {"checkpoint": str(run.path), "position": run.position,
                               "num_tokens": int(run.tokens.mask_modules[0].num_tokens), "images": images, "levels": {}}
    for level in levels or run.levels:
        if level not in maps:
            raise ValueError(f"level {level!r}: this token run has levels {run.levels}")
        dice = pairwise_dice(maps[level]["masks"])
        fig = plot_masks(batch.originals, maps[level], level, sizes, padded)
        save_figure(fig, out / f"masks_{level}.png")
        plt.close(fig)
        fig = plot_dice(dice, level)
        save_figure(fig, out / f"dice_{level}.png")
        plt.close(fig)
        t = dice.shape[0]
        off = dice[~torch.eye(t, dtype=torch.bool)]
        summary["levels"][level] = {
            "mean_weight": maps[level]["weights"].mean(0).tolist(),
            "mean_mask": maps[level]["masks"].mean((0, 2, 3)).tolist(),
            "dice": dice.tolist(),
            "mean_offdiagonal_dice": float(off.mean()) if off.numel() else None,
        }
    atomic_write_json(out / "summary.json", summary)
    return summary


def collect(summaries: list[str | Path], out: str | Path) -> dict[str, Any]:
    """One JSON indexing the token runs of a table: per run, its figures folder and per level the
    mean off-diagonal Dice and the largest mean token weight."""
    from replic.io import atomic_write_json

    index: dict[str, Any] = {"runs": {}}
    for path in map(Path, summaries):
        summary = json_load(path)
        index["runs"][path.parent.name] = {
            "figures": str(path.parent), "checkpoint": summary["checkpoint"], "num_tokens": summary["num_tokens"],
            "levels": {level: {"mean_offdiagonal_dice": f["mean_offdiagonal_dice"],
                               "max_mean_weight": max(f["mean_weight"])} for level, f in summary["levels"].items()},
        }
    atomic_write_json(Path(out), index)
    return index


def json_load(path: Path) -> Any:
    import json

    return json.loads(Path(path).read_text())


def plot_ap_vs_tokens(table_csv: str | Path, experiments_dir: str | Path, out: str | Path, scale: str = "paper") -> Path:
    """AP of every MasKD row of a table against its number of tokens (from the row's experiment
    config), with the undistilled student (a row without MasKD) as a horizontal line."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from replic.engine.config import resolve_raw
    from replic.viz.plots import save_figure

    points, baseline = [], None
    with Path(table_csv).open() as handle:
        for row in csv.DictReader(handle):
            if not row["experiment"] or row["AP_ours"] in ("", "nan"):
                continue
            method = resolve_raw(Path(experiments_dir) / f"{row['experiment']}.yaml", scale).get("method") or {}
            if method.get("name") == "maskd":
                points.append((int(method.get("num_tokens", 6)), float(row["AP_ours"])))
            elif baseline is None:
                baseline = float(row["AP_ours"])
    if not points:
        raise ValueError(f"{table_csv}: no evaluated MasKD row")
    points.sort()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot([t for t, _ in points], [ap for _, ap in points], "o-", label="MasKD student (ours)")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="student alone (ours)")
    ax.set_xlabel("receptive tokens per level, T")
    ax.set_ylabel("box AP")
    ax.set_xticks([t for t, _ in points])
    ax.set_title("MasKD: AP vs number of tokens (published: not in our sources)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, out)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI entry (see the module docstring); ``collect OUT SUMMARY...`` and ``ap-vs-tokens CSV OUT``
    are the workflow's table-level steps."""
    argv = list(argv if argv is not None else __import__("sys").argv[1:])
    if argv[:1] == ["collect"]:
        collect(argv[2:], argv[1])
        return 0
    if argv[:1] == ["ap-vs-tokens"]:
        scale = argv[4] if len(argv) > 4 else "paper"
        plot_ap_vs_tokens(argv[1], argv[3], argv[2], scale)
        return 0
    parser = argparse.ArgumentParser(prog="python -m replic.viz.receptive_tokens", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a maskd_tokens run's checkpoint_final.pt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", nargs="+", default=["@0", "@1", "@2"], help="val image ids, @N or files")
    parser.add_argument("--level", nargs="*", default=None, help="levels to draw (default: all)")
    parser.add_argument("--data-root", default=None, help="override the run's data.root")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    render(args.checkpoint, args.out, args.images, args.level, args.data_root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
