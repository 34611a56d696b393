"""PNG plots of a run's metrics.jsonl: loss curves (train and validation) and, per MoE layer, a heatmap of each
expert's share of the routed tokens over iterations.

    python tools/plot_metrics.py --metrics runs/demo/metrics.jsonl --output runs/demo/plots
writes loss.png and expert_load.png. Needs matplotlib (the `logging` extra).
"""

from __future__ import annotations

import argparse
import json
import os


def read_metrics(path: str) -> dict[str, list[dict]]:
    """The records of metrics.jsonl by split ("train", "valid", "test"), by iteration. A resumed run appends to
    the file and may log an iteration again: the last record of an iteration wins."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--metrics {path} does not exist: point it at the metrics.jsonl of a run's --log-dir "
                                f"(or --save) directory")
    out: dict[str, dict[int, dict]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not JSON ({err}); was the run killed while writing it?") from None
            out.setdefault(record.get("split", "train"), {})[record["iteration"]] = record
    if not out.get("train"):
        raise ValueError(f"{path} has no training records")
    return {split: [records[i] for i in sorted(records)] for split, records in out.items()}


def expert_shares(train: list[dict]) -> dict[int, tuple[list[int], list[list[float]]]]:
    """Per MoE layer: the logged iterations and, for each, every expert's share of the routed tokens."""
    layers: dict[int, tuple[list[int], list[list[float]]]] = {}
    for record in train:
        for layer, values in record.get("moe", {}).items():
            counts = values["tokens_per_expert"]
            total = sum(counts) or 1
            iterations, shares = layers.setdefault(int(layer), ([], []))
            iterations.append(record["iteration"])
            shares.append([c / total for c in counts])
    return dict(sorted(layers.items()))


def plot(metrics: dict[str, list[dict]], output: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("valid", "o-"), ("test", "s")):
        records = metrics.get(split, [])
        if records:
            ax.plot([r["iteration"] for r in records], [r["lm loss"] for r in records], style, label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(os.path.join(output, "loss.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    layers = expert_shares(metrics["train"])
    if layers:
        fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.6 + 1.4 * len(layers)), squeeze=False)
        for ax, (layer, (iterations, shares)) in zip(axes[:, 0], layers.items()):
            columns = list(zip(*shares))  # [experts][iterations]
            image = ax.imshow(columns, aspect="auto", cmap="viridis", interpolation="nearest",
                              extent=(iterations[0] - 0.5, iterations[-1] + 0.5, len(columns) - 0.5, -0.5))
            ax.set_ylabel(f"layer {layer}\nexpert")
            fig.colorbar(image, ax=ax, label="share of tokens")
        axes[-1, 0].set_xlabel("iteration")
        fig.tight_layout()
        written.append(os.path.join(output, "expert_load.png"))
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="a run's metrics.jsonl")
    parser.add_argument("--output", required=True, help="directory for the PNG files")
    args = parser.parse_args(argv)
    for path in plot(read_metrics(args.metrics), args.output):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
