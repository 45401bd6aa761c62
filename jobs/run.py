"""The pieces every training job starts with (pretrain.py, finetune.py): logging, the resumed state, the loader."""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable


from jobs import checkpoint, rng_state
from jobs.derived import Derived
from jobs.engine import Runtime
from jobs.errors import ConfigError
from jobs.launch import Dist
from jobs.loop import Progress
from jobs.startup import agree, check_shared_dir
from pipeline.config import DataConfig
from pipeline.loader import Loader, build_loader

log = logging.getLogger("jobs.run")


def parse_job_args(argv: list[str] | None, doc: str, set_example: str) -> argparse.Namespace:
    """The command line every training job takes: --config FILE, repeatable --set key=value overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file in jobs/configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, dotted key, YAML value (repeatable): --set {set_example}")
    # The deepspeed launcher appends --local_rank; LOCAL_RANK in the environment says the same, and is what we read.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def prepare_run_dir(output_dir: str, derived: Derived, runtime: Runtime, dump: Callable[[dict], str],
                    dist: Dist) -> Path:
    """output_dir/resolved.yaml: the config as run (`dump(extra)`), with the derived values and the runtime
    (precision, compile), beside the checkpoints. Refuses a URL, and a directory that is not the same on every rank
    (jobs.startup.check_shared_dir), on every rank before any training."""
    if "://" in output_dir:
        # DeepSpeed and torch.save write checkpoints through the local filesystem, and the crash-safe save relies on
        # os.replace: object storage has neither.
        raise ConfigError(f"output_dir: {output_dir} is a URL; checkpoints need a directory on a filesystem every "
                          "node mounts (NFS, Lustre, FSx, GPFS); copy the run to object storage afterwards")
    out = Path(output_dir)
    check_shared_dir(out, dist.rank)

    def write_resolved() -> None:
        if dist.is_main:
            extra = {f.name: getattr(derived, f.name) for f in fields(derived)}
            extra.update(asdict(runtime))
            (out / "resolved.yaml").write_text(dump(extra))
            log.info("derived: %s", extra)

    agree(write_resolved, f"writing {out / 'resolved.yaml'}")
    return out


def build_data(cfg: DataConfig, dist: Dist, state: dict | None) -> Loader:
    """This rank's loader, once every rank's has started (/dev/shm and the worker processes can fail on one node
    only: jobs.startup.agree)."""

    def start() -> Loader:
        loader = build_loader(cfg, dist.rank, dist.world_size, dist.device)
        if state is not None:
            loader.load_state_dict(state)
        loader.start()  # the workers, their /dev/shm slots and DALI's pipeline: here, not in step 1
        return loader

    return agree(start, "starting the data loader", undo=lambda loader: loader.close())


def resume(engine, ckpt_dir: Path, dist: Dist, enabled: bool) -> tuple[Progress, dict | None]:
    """Progress and this rank's loader state from the latest complete checkpoint, or a fresh start."""
    tag = checkpoint.agreed_latest(ckpt_dir, dist.rank) if enabled else None
    if tag is None:
        return Progress(), None
    state = checkpoint.load(engine, ckpt_dir, tag, dist.rank)
    rng_state.restore(state["rng"])
    progress = Progress(**state["progress"])
    log.info("resumed from %s: step %d, %d samples seen", tag, progress.step, progress.samples_seen)
    return progress, state["data"]
