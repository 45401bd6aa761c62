"""Loss curves of a run directory as a PNG: one panel of every loss term (log scale), one of the learning rate."""

from __future__ import annotations

import json
from pathlib import Path

LOSS_TERMS = ("loss", "contrastive", "reconstruction", "denoise")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl -> records; a resumed run may have re-logged steps, so the last record of a step wins."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "step" in record:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_run(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out_png = Path(out_png) if out_png else run_dir / "loss.png"
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    steps = [r["step"] for r in records]
    for term in LOSS_TERMS:
        points = [(s, r[term]) for s, r in zip(steps, records) if isinstance(r.get(term), (int, float))]
        if points:
            ax_loss.plot(*zip(*points), label=term)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss (mean over the logging window)")
    ax_loss.legend()
    ax_loss.set_title(run_dir.name)
    ax_lr.plot(steps, [r.get("lr") for r in records])
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
