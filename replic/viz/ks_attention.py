"""What KS-DETR's teachers "see": GT mask on the token grid and student vs teacher encoder attention.

For one val image (the ``--image``-th whose GT mask has foreground tokens on the grid) of a KS run, the figure shows
the GT foreground mask on the feature grid (as the KS layer gets it), then, for a few
foreground and background query tokens, the head-averaged attention of the KS layer: the
student's map A, teacher 1's own map A_t (share-V branch: GT-modified queries and keys),
and teacher 2's map, which *is* A (share-A branch: it shares the student's attention and
differs only in its values). A JSON beside the figure gives, per map and token kind, the
attention mass that falls on foreground tokens.

    python -m replic.viz.ks_attention --checkpoint runs/smoke/ks_cdetr_r50_50ep/checkpoint_final.pt \\
        --out results/figures/smoke/ks_attention/ks_cdetr_r50_50ep.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replic.methods.ks_detr import KSEncoderLayer, gt_foreground_mask, mask_on_grid

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _ks_layer(model: torch.nn.Module) -> KSEncoderLayer:
    layers = [m for m in model.transformer.encoder.layers if isinstance(m, KSEncoderLayer)]
    if not layers:
        raise ValueError("the checkpoint's model has no KS-DETR encoder layer (method.name is not ks_detr)")
    return layers[0]


def _val_items(data_cfg: Any):
    """Val images (val transforms applied) with at least one GT box, in dataset order."""
    from replic.data import build_dataset

    dataset = build_dataset(data_cfg, "val")
    for i in range(len(dataset)):
        image, target = dataset[i]
        if len(target["boxes"]):
            yield image, target


def _pick(indices: torch.Tensor, count: int) -> list[int]:
    if not len(indices):
        return []
    spots = torch.linspace(0, len(indices) - 1, steps=min(count, len(indices))).round().long()
    return indices[spots].tolist()


@torch.no_grad()
def attention_summary(model: torch.nn.Module, image: torch.Tensor, target: dict[str, torch.Tensor],
                      options: Any, tokens_per_kind: int = 2) -> dict[str, Any]:
    """GT grid, chosen tokens and the head-averaged attention rows of student and teachers."""
    layer = _ks_layer(model)
    images, mask = image[None], torch.zeros(1, *image.shape[-2:], dtype=torch.bool)
    captured: dict[str, Any] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["inputs"] = args, kwargs.get("layer_inputs") or {}

    canvas = gt_foreground_mask([target], tuple(images.shape[-2:]), options.pad_fg_pixel, options.mask_criterion)
    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(images, mask, encoder_inputs={"ks_fg_mask": canvas})
    finally:
        handle.remove()
    src, pos, padding = captured["args"]
    size = tuple(captured["inputs"]["feature_size"])
    fg = mask_on_grid(canvas, size, padding)
    maps = {k: v.mean(1)[0] for k, v in layer.attention_maps(src, pos, padding, fg).items()}  # (N, N)
    valid = ~padding[0] if padding is not None else torch.ones(fg.shape[1], dtype=torch.bool)
    fg_tokens = torch.nonzero((fg[0] > 0) & valid).flatten()
    bg_tokens = torch.nonzero((fg[0] == 0) & valid).flatten()
    chosen = [("fg", t) for t in _pick(fg_tokens, tokens_per_kind)] + [("bg", t) for t in _pick(bg_tokens, tokens_per_kind)]
    panels = {"student A": maps["A"]}
    if "A_t" in maps:
        panels["teacher share-V: A_t"] = maps["A_t"]
    if "v_t" in layer.self_attn.rows:
        panels["teacher share-A: = A"] = maps["A"]
    stats: dict[str, dict[str, float]] = {}
    for name, m in panels.items():
        for kind, tokens in (("fg", fg_tokens), ("bg", bg_tokens)):
            if len(tokens):
                stats.setdefault(name, {})[f"{kind}_query_mass_on_fg"] = float((m[tokens] @ fg[0]).mean())
    return {"image": image, "target": target, "size": size, "fg": fg[0].view(size), "tokens": chosen,
            "panels": {k: v for k, v in panels.items()}, "stats": stats}


def plot(summary: dict[str, Any], title: str = "") -> Any:
    """Figure: GT grid beside student / teacher attention rows, one row per chosen token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = summary["size"]
    rgb = np.clip(summary["image"].permute(1, 2, 0).numpy() * STD + MEAN, 0, 1)
    rows = max(1, len(summary["tokens"]))
    cols = 1 + len(summary["panels"])
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    extent = (0, rgb.shape[1], rgb.shape[0], 0)
    for r, (kind, token) in enumerate(summary["tokens"] or [("none", -1)]):
        ax = axes[r, 0]
        ax.imshow(rgb, extent=extent)
        ax.imshow(summary["fg"].numpy(), extent=extent, cmap="Greens", alpha=0.45, vmin=0, vmax=1)
        if token >= 0:
            y, x = divmod(token, w)
            cy, cx = (y + 0.5) * rgb.shape[0] / h, (x + 0.5) * rgb.shape[1] / w
            ax.plot([cx], [cy], marker="x", color="red" if kind == "fg" else "blue", markersize=10, mew=2)
        ax.set_title(f"GT mask on {h}x{w} grid; {kind} token", fontsize=8)
        for c, (name, maps) in enumerate(summary["panels"].items(), start=1):
            ax = axes[r, c]
            ax.imshow(rgb, extent=extent)
            if token >= 0:
                ax.imshow(maps[token].view(h, w).numpy(), extent=extent, cmap="magma", alpha=0.7)
            ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def collect(summaries: list[str | Path], out: str | Path) -> Path:
    """One CSV row per (run, map) from the figures' JSON summaries: attention mass on foreground."""
    import csv
    import io

    from replic.io import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", "image_id", "fg_tokens", "map", "fg_query_mass_on_fg", "bg_query_mass_on_fg"])
    for path in summaries:
        record = json.loads(Path(path).read_text())
        for name, stats in record["attention_mass_on_fg"].items():
            writer.writerow([record["run"], record["image_id"], record["fg_tokens"], name,
                             *(f"{stats[k]:.4f}" if k in stats else "" for k in ("fg_query_mass_on_fg",
                                                                                  "bg_query_mass_on_fg"))])
    atomic_write_text(out, buffer.getvalue())
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """CLI: render the figure (PNG) and its attention-mass summary (JSON beside it);
    ``collect --out X.csv A.json B.json ...`` gathers summaries into one CSV."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["collect"]:
        parser = argparse.ArgumentParser(prog="python -m replic.viz.ks_attention collect")
        parser.add_argument("--out", required=True)
        parser.add_argument("summaries", nargs="*")
        ns = parser.parse_args(argv[1:])
        print(f"wrote {collect(ns.summaries, ns.out)}")
        return 0
    from replic.config import ConfigError
    from replic.io import atomic_write_bytes
    from replic.methods import parse_method_options
    from replic.viz.loading import load_model_for_viz
    from replic.viz.plots import figure_png_bytes

    parser = argparse.ArgumentParser(prog="python -m replic.viz.ks_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a KS-DETR run's checkpoint_final.pt")
    parser.add_argument("--out", required=True, help="PNG to write; the summary goes to the same name .json")
    parser.add_argument("--image", type=int, default=0,
                        help="which val image with foreground tokens on the grid (0 = the first)")
    parser.add_argument("--tokens", type=int, default=2, help="foreground and background tokens shown, each")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        viz = load_model_for_viz(args.checkpoint)
        raw = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("config") or {}
        _, options = parse_method_options(raw.get("method") or {"name": "none"})
        if viz.data_config is None:
            raise ConfigError(f"{args.checkpoint}: no data config in the run; cannot pick a val image")
        # Small boxes can fall between the grid's sample points and vanish from the mask (official
        # behaviour at pad_fg_pixel 0): show the --image-th val image with foreground on the grid.
        seen, summary = 0, None
        for image, target in _val_items(viz.data_config):
            candidate = attention_summary(viz.model, image, target, options, args.tokens)
            if candidate["fg"].sum() > 0:
                if seen == args.image:
                    summary = candidate
                    break
                seen += 1
        if summary is None:
            raise ValueError(f"--image {args.image}: only {seen} val images have foreground tokens on the grid")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fig = plot(summary, f"{viz.name}: KS layer attention (image id {int(summary['target']['image_id'])})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, figure_png_bytes(fig))
    record = {"run": viz.name, "image_id": int(summary["target"]["image_id"]), "grid": list(summary["size"]),
              "fg_tokens": int(summary["fg"].sum()), "tokens": summary["tokens"],
              "attention_mass_on_fg": summary["stats"]}
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
