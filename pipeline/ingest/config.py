"""IngestConfig: everything `tools/shard.py` takes, and the fingerprint that ties an output prefix to its arguments."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from pipeline.ingest.fetch import HTTP_TIMEOUT_S
from pipeline.ingest.opt_out import DIRECTIVES, check_directives

# The version of the work files' formats (staged tables, shuffle files, summaries) and of the pixel hash: bumped when
# one changes (2: Arrow IPC shuffle files and the OpenCV decode path's hash order; 3: the pixel hash is BLAKE3, not
# SHA-256; both 2026-11-30), so that an output interrupted under an older version is refused with the reason instead
# of resumed into files it cannot read or hashes that never match.
WORK_FORMAT = 3

# Fields added since WORK_FORMAT 3, at the value that does what the tool did before them: left out of the fingerprint
# then, so that an output begun by that version resumes under this one (with `--opt-out-directives ''`: the default
# honours opt-outs, which that version did not, and its staged units would be mixed with ones that do).
_ADDED = {"opt_out_directives": [], "keep_columns": [], "verify_hash": ""}

# --verify-hash's algorithms: hashlib's guaranteed ones with a fixed digest size (not the shake_ XOFs, whose
# hexdigest needs a length).
HASHES = tuple(sorted(a for a in hashlib.algorithms_guaranteed if hashlib.new(a).digest_size))

# Fields that change how the run executes but not which bytes it produces: left out of the fingerprint, so a rerun
# with more workers, another engine or a quieter log resumes the same output.
_EXECUTION_ONLY = ("workers", "engine", "ray_address", "quiet", "overwrite", "storage_options", "keep_staging",
                   "download_threads", "retries", "retry_base_s", "http_timeout_s", "give_up_quarantined",
                   "group_inputs", "bucket_records")


@dataclass(frozen=True)
class CleanConfig:
    min_side: int = 64  # reject if the shorter side is below this
    max_aspect: float = 5.0  # reject if long/short side exceeds this
    max_pixels: int = 100_000_000  # reject from the header, before decoding (decompression bombs)
    max_bytes: int = 200_000_000  # reject files larger than this without reading them
    max_shorter_side: int = 512  # downscale so the shorter side is at most this; 0 keeps the size
    quality: int = 95  # JPEG quality when re-encoding
    reencode: bool = False  # re-encode even JPEGs that could be copied byte for byte


@dataclass(frozen=True)
class IngestConfig:
    sources: tuple[str, ...]
    output: str
    clean: CleanConfig = field(default_factory=CleanConfig)
    samples_per_shard: int = 5000
    unit_size: int = 250  # loose files per work unit (small: balances workers); an archive or parquet file is one
    # Inputs per unit downloaded from the web (a text list's URLs, a url + caption parquet's rows): a unit waits for
    # its slowest URL, two timeouts of a host that never answers (~20 s); 10,000 (img2dataset's shard) clean in
    # ~150 s, of which that wait is a small share (README, known limits).
    web_unit_size: int = 10_000
    dedup: str = "exact"  # "none" | "exact" | "near" (near also drops exact duplicates)
    near_threshold: int = 4  # max Hamming distance between 64-bit pHashes for "near"
    labels_from_folders: bool = False
    image_column: str | None = None  # parquet: None = auto-detect
    label_column: str | None = None  # parquet: None = auto-detect ("label", "cls", "class")
    workers: int = 0  # 0 = all cores
    engine: str = "local"  # "local" | "ray"
    ray_address: str | None = None
    storage_options: dict = field(default_factory=dict)  # fsspec options for sources and output (may hold secrets)
    overwrite: bool = False
    keep_staging: bool = False
    quiet: bool = False
    # Concurrent fetches of loose files / URLs per task (img2dataset: 256 per process). Per web URL ~0.5 s of a live
    # server plus 2% dead hosts x ~20 s = ~0.9 thread-seconds: 128 feed ~140 URLs/s, twice what a core cleans.
    download_threads: int = 128
    retries: int = 5  # attempts per read on a transient fault, the first included; then the unit is quarantined
    retry_base_s: float = 0.5  # first backoff; doubles per attempt (full jitter, capped at 30 s)
    http_timeout_s: float = HTTP_TIMEOUT_S  # a web URL's connect and read timeout, per attempt
    # X-Robots-Tag directives that make a web image the reject "opted_out" (opt_out.py; () honours none). They decide
    # which images are kept, so they are part of the fingerprint.
    opt_out_directives: tuple[str, ...] = DIRECTIVES
    # Parquet columns carried into each sample's JSON under "source_meta" (img2dataset's --save_additional_columns):
    # LAION's NSFW, similarity, LICENSE, ... They change the output, so they are part of the fingerprint.
    keep_columns: tuple[str, ...] = ()
    # "COLUMN" or "COLUMN:ALGORITHM" (sha256 unless named; one of HASHES): a parquet row's
    # image bytes (downloaded or in the file) must have that digest (hex) or are the reject "hash_mismatch", as
    # img2dataset's --verify_hash does for DataComp. "" checks nothing.
    verify_hash: str = ""
    # Finalize without what failed its retries in this run and an earlier one: those loose files (or whole units:
    # an archive, a parquet file) become "quarantined" rejects, staging is removed, and reruns are no-ops (an object
    # that fails forever no longer blocks the dataset).
    give_up_quarantined: bool = False
    # How dedup splits its work (library only; the output does not depend on them): inputs per map / resolve task
    # (about 4M shuffle records per task with --dedup near) and shuffle records per reduce task (~200 MB).
    group_inputs: int = 250_000
    bucket_records: int = 4_000_000

    def __post_init__(self):
        if self.dedup not in ("none", "exact", "near"):
            raise ValueError(f"dedup must be none, exact or near, not {self.dedup!r}")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"engine must be local or ray, not {self.engine!r}")
        if self.samples_per_shard < 1 or self.unit_size < 1 or self.web_unit_size < 1:
            raise ValueError("samples_per_shard, unit_size and web_unit_size must be positive")
        if not 0 <= self.near_threshold <= 30:
            raise ValueError("near_threshold must be in [0, 30]")  # 64 / (t + 2) bits per block must stay >= 2
        if self.download_threads < 1 or self.retries < 1 or not self.http_timeout_s > 0:
            raise ValueError("download_threads, retries and http_timeout_s must be positive")
        check_directives(self.opt_out_directives)
        if len(set(self.keep_columns)) != len(self.keep_columns) or not all(self.keep_columns):
            raise ValueError(f"keep_columns must be distinct column names, not {self.keep_columns!r}")
        # Equivalent spellings, one fingerprint: a rerun with "h:MD5" for "h:md5" resumes rather than is refused.
        object.__setattr__(self, "opt_out_directives", tuple(sorted(set(self.opt_out_directives))))
        if self.verify_hash:
            column, colon, algorithm = self.verify_hash.rpartition(":")
            column, algorithm = (column, algorithm.lower()) if colon else (algorithm, "sha256")
            if not column or algorithm not in HASHES:
                raise ValueError(f"verify_hash {self.verify_hash!r}: COLUMN or COLUMN:ALGORITHM, the algorithm one "
                                 f"of {', '.join(HASHES)}")
            object.__setattr__(self, "verify_hash", f"{column}:{algorithm}")

    def hash_check(self) -> tuple[str, str] | None:
        """(column, algorithm) of verify_hash, or None."""
        return tuple(self.verify_hash.rsplit(":", 1)) if self.verify_hash else None

    def public_dict(self) -> dict:
        """All fields, with storage_options values redacted: safe to write to config.json and report.json."""
        d = asdict(self)
        d["storage_options"] = {k: "***" for k in self.storage_options}
        d["sources"] = list(self.sources)  # as JSON reads them back (report.json's config equals the run's)
        d["opt_out_directives"] = list(self.opt_out_directives)
        d["keep_columns"] = list(self.keep_columns)
        return d

    def fingerprint(self, before_opt_outs: bool = False) -> str:
        """Of the arguments that shape the output, and of WORK_FORMAT: an output interrupted under other arguments,
        or under a version of this tool whose work files differ, is refused (preflight.py), not resumed into a mix."""
        d = self.public_dict()
        for name in _EXECUTION_ONLY:
            d.pop(name)
        for name, before in _ADDED.items():
            if d[name] == before:
                d.pop(name)
        if before_opt_outs:  # what the version before opt-outs computed for these arguments, directives aside
            d.pop("opt_out_directives", None)
        d["work_format"] = WORK_FORMAT
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
