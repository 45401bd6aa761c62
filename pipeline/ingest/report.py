"""report.json content and the short table the CLI prints at the end of a run."""

from __future__ import annotations

from collections import Counter

DUPLICATE_REASONS = ("duplicate_exact", "duplicate_near", "duplicate_source")


def build_report(config: dict, fingerprint: str, verdicts: Counter, shards: int, shard_bytes: int,
                 seconds: float, classes: tuple[str, ...]) -> dict:
    inputs = sum(verdicts.values())
    duplicates = {r: verdicts[r] for r in DUPLICATE_REASONS if verdicts[r]}
    rejected = {r: n for r, n in sorted(verdicts.items()) if r != "keep" and r not in DUPLICATE_REASONS}
    return {
        "config": config,  # storage_options redacted
        "fingerprint": fingerprint,
        "inputs": inputs,
        "kept": verdicts["keep"],
        "rejected": sum(rejected.values()),
        "rejected_by_reason": rejected,
        "duplicates": sum(duplicates.values()),
        "duplicates_by_kind": duplicates,
        "shards": shards,
        "bytes": shard_bytes,
        "classes": list(classes),
        "seconds": round(seconds, 3),
        "images_per_s": round(inputs / seconds, 2) if seconds > 0 else None,
    }


def format_table(report: dict) -> str:
    rows = [("inputs", report["inputs"]), ("kept", report["kept"]), ("rejected", report["rejected"])]
    rows += [(f"  {r}", n) for r, n in report["rejected_by_reason"].items()]
    rows += [("duplicates", report["duplicates"])]
    rows += [(f"  {r}", n) for r, n in report["duplicates_by_kind"].items()]
    rows += [("shards", report["shards"]), ("bytes", report["bytes"]), ("seconds", report["seconds"]),
             ("images/s", report["images_per_s"])]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
