"""Draw a run's loss curves (the PNG the trainer writes at the end) for any run directory.

    python -m tools.plot runs/demo            # -> runs/demo/loss.png
    python tools/plot.py runs/demo --out curves.png
"""

from __future__ import annotations

import argparse

from jobs.plots import plot_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    main()
