"""Build cleaned, deduplicated WebDataset shards from raw image dumps.

    python tools/shard.py SOURCE [SOURCE ...] --output URL [options]
    python tools/shard.py ~/dump s3://raw/part-*.tar --output s3://data/v1 --dedup near --workers 16

SOURCE and URL are local paths or fsspec URLs; credentials and endpoints come from the standard AWS environment,
plus --storage-options JSON. Library: pipeline.ingest.engine.run_ingest.
Exit status: 0 done; 2 refused before any work (the message names the culprit); 3 some units or tasks were
quarantined after their retries (listed; the output holds everything else; rerun the same command to retry them);
4 done with --give-up-quarantined, giving up what failed in this run and an earlier one: the loose files that
failed their retries in both, and the units that failed whole in both (what fails for the first time is retried
by the next run, never given up at once: the fault may pass); the output is final without them, they are in
rejects.parquet with reason "quarantined" (a rerun is a no-op; --overwrite starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.ingest.config import CleanConfig, IngestConfig
from pipeline.ingest.engine import run_ingest
from pipeline.ingest.phase import QuarantineError
from pipeline.ingest.report import format_table
from pipeline.ingest.sources import IngestError


def _names(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.split(",") if d.strip())


def _directives(text: str) -> tuple[str, ...]:
    return tuple(d.lower() for d in _names(text))


def parse_args(argv: list[str] | None = None) -> IngestConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--output", required=True)
    c = CleanConfig()
    p.add_argument("--min-side", type=int, default=c.min_side)
    p.add_argument("--max-aspect", type=float, default=c.max_aspect)
    p.add_argument("--max-pixels", type=int, default=c.max_pixels)
    p.add_argument("--max-bytes", type=int, default=c.max_bytes)
    p.add_argument("--max-shorter-side", type=int, default=c.max_shorter_side, help="0 = keep size")
    p.add_argument("--quality", type=int, default=c.quality)
    p.add_argument("--reencode", action="store_true", help="re-encode JPEGs that could be copied byte for byte")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--unit-size", type=int, default=IngestConfig.unit_size,
                   help="loose files (or rows of a parquet file of image bytes) per work unit")
    p.add_argument("--web-unit-size", type=int, default=IngestConfig.web_unit_size,
                   help="URLs per work unit (a text list of URLs, a url + caption parquet): a unit waits for its "
                        "slowest URL, so it must clean for much longer than two --http-timeout")
    p.add_argument("--dedup", choices=("none", "exact", "near"), default="exact")
    p.add_argument("--near-threshold", type=int, default=4, help="max pHash Hamming distance for --dedup near")
    p.add_argument("--labels-from-folders", action="store_true")
    p.add_argument("--image-column")
    p.add_argument("--label-column")
    p.add_argument("--workers", type=int, default=0, help="0 = all cores")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--keep-staging", action="store_true")
    p.add_argument("--quiet", action="store_true", help="log lines instead of progress bars")
    p.add_argument("--download-threads", type=int, default=IngestConfig.download_threads,
                   help="concurrent fetches of loose files and URLs per task")
    p.add_argument("--retries", type=int, default=IngestConfig.retries,
                   help="attempts per read on a transient fault (then the unit is quarantined until a rerun)")
    p.add_argument("--http-timeout", type=float, default=IngestConfig.http_timeout_s,
                   help="seconds a web URL may take to connect, and between bytes, per attempt")
    p.add_argument("--keep-columns", type=_names, default="",
                   help="comma-separated parquet columns carried into each sample's JSON under source_meta "
                        "(e.g. NSFW,similarity,LICENSE); the first readable parquet source must have them")
    p.add_argument("--verify-hash", default="", metavar="COLUMN[:ALGORITHM]",
                   help="a parquet column holding each image's hex digest (sha256 unless named, e.g. sha256 or "
                        "md5hash:md5): other bytes are the reject 'hash_mismatch' (DataComp); rows without one pass")
    p.add_argument("--opt-out-directives", type=_directives, default=",".join(IngestConfig.opt_out_directives),
                   help="comma-separated X-Robots-Tag directives that make a web image a reject ('opted_out'), "
                        "addressed to every agent or to canvit-ingest; '' honours none")
    p.add_argument("--give-up-quarantined", action="store_true",
                   help="finalize the output without what failed in this run and an earlier one (an object that "
                        "keeps failing: 5xx, resets): a loose file that failed its retries in both becomes a reject "
                        "(reason 'quarantined', its last error), the other inputs of its unit kept; a unit that "
                        "failed whole in both (an archive, a parquet file, most of its files) goes to "
                        "rejects.parquet entire (a unit of web URLs whose outage canaries can check: once they "
                        "confirm it; if they answer, its failing URLs are rejects and the rest kept). Staging is "
                        "removed, exit status 4. What fails "
                        "for the first time is left for the next run (exit 3)")
    a = p.parse_args(argv)
    clean = CleanConfig(a.min_side, a.max_aspect, a.max_pixels, a.max_bytes, a.max_shorter_side, a.quality, a.reencode)
    return IngestConfig(
        sources=tuple(a.sources), output=a.output, clean=clean, samples_per_shard=a.samples_per_shard,
        unit_size=a.unit_size, web_unit_size=a.web_unit_size, dedup=a.dedup, near_threshold=a.near_threshold,
        labels_from_folders=a.labels_from_folders, image_column=a.image_column, label_column=a.label_column,
        workers=a.workers, engine=a.engine, ray_address=a.ray_address, storage_options=a.storage_options,
        overwrite=a.overwrite, keep_staging=a.keep_staging, quiet=a.quiet, download_threads=a.download_threads,
        retries=a.retries, http_timeout_s=a.http_timeout, give_up_quarantined=a.give_up_quarantined,
        opt_out_directives=a.opt_out_directives, keep_columns=a.keep_columns,
        verify_hash=a.verify_hash,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    try:
        report = run_ingest(cfg)
    except QuarantineError as e:  # the run went as far as it could; a rerun retries the quarantined tasks
        print(f"shard.py: {e}", file=sys.stderr)
        return 3
    except IngestError as e:
        print(f"shard.py: error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    status, message = exit_status(report)
    if message:
        print(message, file=sys.stderr)
    return status


def exit_status(report: dict) -> tuple[int, str]:
    """0: complete; 3: units left quarantined (the output lacks them until a rerun stages them); 4: final, with
    inputs given up (--give-up-quarantined). The message for stderr ("" for 0)."""
    given_up = report["rejected_by_reason"].get("quarantined", 0)
    quarantined, gave_up = report.get("quarantined", []), report.get("gave_up_quarantined", False)  # older reports
    units = "".join(f"\n  unit {q['unit']}: {q['reason']}" for q in quarantined[:20])
    if quarantined and not gave_up:  # rerunning the same command retries them
        earlier = (f" ({given_up} input(s) that had failed in an earlier run too were given up: they stay rejects)"
                   if given_up else "")
        return 3, (f"shard.py: {len(quarantined)} unit(s) quarantined after their retries, left out of "
                   "this output; rerun the same command to retry them (or add --give-up-quarantined to finalize "
                   f"without what fails again){earlier}:{units}")
    if given_up or gave_up:
        whole = f", and every input of {len(quarantined)} unit(s) that failed whole in both" if quarantined else ""
        return 4, (f"shard.py: {given_up} input(s) given up: the loose files that failed their retries in this run "
                   f"and an earlier one{whole}; the output is final without them; they are in rejects.parquet with "
                   f"reason 'quarantined'{units}")
    return 0, ""


if __name__ == "__main__":
    sys.exit(main())
