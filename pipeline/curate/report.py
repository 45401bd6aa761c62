"""report.json: what the curation kept, what it removed and why, and cluster sizes before and after."""

from __future__ import annotations

import numpy as np

from pipeline.curate.balance_stage import BalanceResult
from pipeline.curate.embeddings import EmbeddingSet


def merged_counts(stats: list[dict], section: str) -> dict[str, np.ndarray]:
    """Sum the buckets' {raw, dedup, selected} count lists of a section ("top")."""
    return {k: np.sum([s[section][k] for s in stats], axis=0).astype(np.int64) for k in ("raw", "dedup", "selected")}


def level1_counts(balance: BalanceResult) -> dict[str, np.ndarray]:
    """(k_1,) raw / dedup / selected samples per level-1 cluster (each bucket reports its own clusters)."""
    out = {k: np.zeros(len(balance.quotas), np.int64) for k in ("raw", "dedup", "selected")}
    for s in balance.stats:
        ids = np.asarray(s["level1"]["ids"], dtype=np.int64)
        for k in out:
            out[k][ids] += np.asarray(s["level1"][k], dtype=np.int64)
    return out


def _summary(sizes: np.ndarray) -> dict:
    nonempty = sizes[sizes > 0]
    if not len(nonempty):
        return {"clusters": 0}
    return {"clusters": int(len(nonempty)), "min": int(nonempty.min()), "median": float(np.median(nonempty)),
            "max": int(nonempty.max()), "max_over_median": round(float(nonempty.max() / np.median(nonempty)), 2)}


def build_report(config: dict, emb: EmbeddingSet, balance: BalanceResult, num_clusters: int, shards: int,
                 shard_bytes: int, seconds: dict[str, float]) -> dict:
    top = merged_counts(balance.stats, "top")
    level1 = level1_counts(balance)
    labels: dict[str, list[int]] = {}
    for s in balance.stats:
        for label, c in s["labels"].items():
            labels[label] = [a + b for a, b in zip(labels.get(label, [0, 0, 0]), c)]
    groups = sorted((g for s in balance.stats for g in s["groups"]), key=lambda g: (-g[0], g[1]))[:10]
    order = np.argsort(-top["raw"], kind="stable")
    raw, dedup, selected = (int(top[k].sum()) for k in ("raw", "dedup", "selected"))
    return {
        "config": config,
        "inputs": emb.listed,
        "unreadable": emb.listed - emb.embedded,
        "embedded": emb.embedded,
        "duplicates_removed": raw - dedup,
        "after_dedup": dedup,
        "balance_removed": dedup - selected,
        "selected": selected,
        "dedup": {"clusters": num_clusters, "largest_groups": [{"kept_key": k, "size": n} for n, k in groups]},
        "hierarchy": {"clusters_per_level": [len(c) for c in balance.hierarchy.centroids],
                      "level1_sizes": {k: _summary(v) for k, v in level1.items()}},
        "top_clusters": [{"cluster": int(t), "raw": int(top["raw"][t]), "after_dedup": int(top["dedup"][t]),
                          "selected": int(top["selected"][t])} for t in order if top["raw"][t]],
        "labels": {k: dict(zip(("raw", "after_dedup", "selected"), v)) for k, v in sorted(labels.items(),
                                                                                           key=lambda kv: int(kv[0]))
                   if k != "-1"},
        "shards": shards,
        "bytes": shard_bytes,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }


def format_table(report: dict) -> str:
    rows = [("inputs", report["inputs"]), ("unreadable", report["unreadable"]),
            ("duplicates removed", report["duplicates_removed"]), ("after dedup", report["after_dedup"]),
            ("removed by balancing", report["balance_removed"]), ("selected", report["selected"]),
            ("clusters per level", report["hierarchy"]["clusters_per_level"]), ("shards", report["shards"])]
    rows += [(f"seconds {k}", v) for k, v in report["seconds"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
