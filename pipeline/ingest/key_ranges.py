"""List one key range of an S3 prefix, at most LIST_CAP keys, and cut what is left of the range for more tasks.

A flat prefix of 300M keys listed by one task is 300k sequential ListObjectsV2 pages of 1,000 keys (hours at
30-80 ms a page) and every key's info held in one process. Here a task lists the keys of a range (after, upto] of
the prefix (StartAfter = after; pages followed by ContinuationToken; a key past `upto` ends it) until it holds
LIST_CAP of them. If the range goes on, the task returns cut points that split the rest into sub-ranges, and the
driver submits those as the next round of tasks: it holds bounds, never keys.

Cut points follow the keys' trie. With F and L the first and last keys listed and d the first position where they
differ, the rest of the range is (L, L[:d] + c] for the next character c of the key alphabet at position d, then
the siblings of L[d], L[d-1], ... L[0] in turn: L[:p] + c for every character c above L[p]. Those subtrees grow
geometrically (for decimal-numbered keys each level holds 10x the one below), so a range of n keys is split into
ranges of at most ~n/|alphabet| in one round and the number of rounds grows with the log of the prefix's size: at
300M numbered keys, 4-5 rounds. A cut that falls where there are no keys costs one request that returns nothing.
The alphabet is the characters seen at the positions that vary among the keys listed (digits for numbered keys).
Above d the listed keys show nothing, so probes look: one request of one key after the subtree of L[:p] (p = d
first) finds the next key K; K branches off L at a position q < p, the positions between q and p have no keys
after L (no cuts there), and the next probe starts after the subtree of L[:q]. At q the cuts are K[q] and the
characters above it: the sampled alphabet's if it holds K[q], else a broad one (S3's safe characters), since then
the sampled one evidently does not describe that level: sibling folders named by words under one walked prefix
("train/apple/..., train/banana/...", each bigger than the cap) are otherwise peeled off one per round (200
folders: 201 rounds; with the probes 5). A few probes a task (one per level where keys branch, at most MAX_PROBES,
then the sampled alphabet at every lower position), against its 200 pages. A key with a character in neither
alphabet is still listed, by the range that holds it (the ranges partition the whole key space: the last one
reaches `upto`), only later in the rounds.

The ranges rely on the store listing in ascending key order from StartAfter. Keys at or below StartAfter are
skipped (a store that ignores it costs time, not duplicates). A store that lists out of order (S3 Express One Zone
directory buckets do) gives a folder that one task lists whole (sorted afterwards) or a clear error once the
folder needs ranges.

Ranges are (after, upto] with `after` exclusive (S3's StartAfter) and `upto` inclusive, so consecutive bounds
partition the key space exactly: a key equal to a cut point belongs to the range below it.

With Delimiter="/" (a directory's top level) each page also returns CommonPrefixes (sub-folders). Every sub-folder
is found by the range that contains its name (its keys all sort after it); a range that starts inside a
sub-folder's keys may report it again (S3 rolls those keys up), so callers dedup sub-folder names.

Why S3 only: the range needs the store's list call with a start key (ListObjectsV2's StartAfter, called through
s3fs's `call_s3`, which signs the request and maps errors as every other s3fs call). Other object stores have one
(GCS startOffset, Azure marker) but no code here calls them: their folders are listed whole by one task, as are
local folders (the OS lists one directory in one go; sources.py still cuts a big listing into parts of LIST_CAP).
"""

from __future__ import annotations

import bisect
import functools
import os
import string
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING

from pipeline.ingest.retry import RetryPolicy, retry

if TYPE_CHECKING:  # imported where used: s3fs costs every ingest process ~0.5 s to import, S3 or not
    import s3fs

# Keys one listing task holds at most. A task of 200k keys peaks at 370 MB RSS, 217 MB above its imports (measured
# on moto, bench/listing.py: ~1.1 KB a key, pages, rows and the part's Arrow table), inside the listing task's 1 GB
# memory request; its 200 pages are 6-16 s of S3 requests plus ~11 s of the client's CPU (54 us a key), long
# against a task's overhead (~10 ms on Ray, one part written), short enough that a round does not wait long for
# its slowest task.
LIST_CAP = 200_000
# Sub-ranges one task hands back at most (evenly thinned beyond): a round's task count stays bounded.
MAX_SPLIT = 128
PAGE_KEYS = 1000  # S3's largest page
# Probes one task makes at most for the levels above the varying part of its keys (one per level where keys branch).
MAX_PROBES = 16
# The cut characters at a probed level the sampled alphabet does not describe: S3's "safe characters" for key names.
BROAD = "".join(sorted(string.digits + string.ascii_letters + "!-_.*'()"))
LAST_CHAR = "\U0010ffff"  # the largest code point: L[:p] + LAST_CHAR is past the keys under L[:p] (bar ones under it)


@dataclass(frozen=True)
class RangeListing:
    """What one range task listed: objects in key order as (key, size, ETag), sub-folder keys with their trailing
    "/" (delimited listings only), and the rest of the range still to list as bounds: (rest[0], rest[1]], ...,
    (rest[-1], upto]; empty when the range is done. Tuples of strings and ints, not botocore's dicts (each with a
    list inside): the garbage collector stops tracking such tuples, while the dicts, kept alive, lengthened its
    every pass (58.6 -> 43.6 CPU-us per key of a task on moto without them)."""

    objects: list[tuple[str, int, str]]
    subfolders: list[str]
    rest: tuple[str, ...]


def range_listable(fs) -> bool:
    """S3: fsspec's "s3" protocol, which is s3fs (not version-aware: that listing is ListObjectVersions, whose
    paging differs)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "s3" in protocols and not getattr(fs, "version_aware", False)


@functools.lru_cache(maxsize=4)
def lister(fs: s3fs.S3FileSystem) -> s3fs.S3FileSystem:
    """A client of its own for listing, the same options as `fs`, whose responses keep LastModified as the string
    S3 sent: botocore's default parses every key's timestamp with dateutil, ~60% of a listing's CPU (profiled on
    the moto server), and only Key, Size and ETag are used. Its own session (s3fs's `session` argument), so the
    other clients of the process parse as usual. One per process and set of options."""
    import s3fs
    from aiobotocore.session import AioSession

    session = AioSession(**fs.kwargs)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return s3fs.S3FileSystem(**{**fs.storage_options, "session": session, "skip_instance_cache": True})


def list_range(fs: s3fs.S3FileSystem, bucket: str, prefix: str, delimited: bool, after: str | None,
               upto: str | None, policy: RetryPolicy, cap: int | None = None) -> RangeListing:
    """Keys of `prefix` in (after, upto] (None: open), at most `cap` (default LIST_CAP) of them, and the cut
    points of what is left. Each page is retried on transient faults."""
    cap = LIST_CAP if cap is None else cap
    base = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": "/"} if delimited else {})}
    request = {**base, **({"StartAfter": after} if after is not None else {})}
    objects: list[tuple[str, int, str]] = []
    subfolders: list[str] = []
    names: list[str] = []  # every item's key, in order: for the cut points
    more, unordered, previous = True, False, None
    while more and len(names) < cap:
        page = retry(lambda: fs.call_s3("list_objects_v2", MaxKeys=min(PAGE_KEYS, cap - len(names)), **request),
                     policy, f"list s3://{bucket}/{prefix} after {after!r}")
        contents = [(o["Key"], (o["Key"], int(o["Size"]), o["ETag"])) for o in page.get("Contents", [])]
        prefixes = [(p["Prefix"], None) for p in page.get("CommonPrefixes", [])]
        items = sorted(contents + prefixes, key=itemgetter(0))
        # each list ascending, and each page after the one before (ContinuationToken resumes in key order)
        unordered |= not (_ascending(contents) and _ascending(prefixes) and
                          (previous is None or not items or items[0][0] > previous))
        previous = items[-1][0] if items else previous
        more = bool(page.get("IsTruncated"))
        for key, obj in items:
            if after is not None and key <= after:  # StartAfter ignored, or a sub-folder re-announced (S3 does)
                continue
            if upto is not None and key > upto:
                more = False
                break
            names.append(key)
            (subfolders if obj is None else objects).append(key if obj is None else obj)
        request["ContinuationToken"] = page.get("NextContinuationToken")
    if unordered and (more or after is not None or upto is not None):
        from pipeline.ingest.sources import IngestError  # imported here: sources.py imports this module

        raise IngestError(f"s3://{bucket}/{prefix} is not listed in ascending key order (S3 Express One Zone "
                          f"directory buckets list out of order) and holds more than {cap:,} keys, more than one "
                          f"listing task takes, so it cannot be listed by key ranges: list such a folder by another "
                          f"means (a text file of its URLs as the SOURCE, or several smaller folders)")
    rest = ()
    if more:
        first, last = (n[len(prefix):] for n in (names[0], names[-1]))
        rel_upto = None if upto is None else upto[len(prefix):]

        def next_key(start: str) -> str | None:
            """The first key or sub-folder name after prefix + start (relative), None if none up to `upto`."""
            page = retry(lambda: fs.call_s3("list_objects_v2", MaxKeys=1, StartAfter=prefix + start, **base),
                         policy, f"list s3://{bucket}/{prefix} after {prefix + start!r}")
            found = [k[len(prefix):] for k in [o["Key"] for o in page.get("Contents", [])] +
                     [p["Prefix"] for p in page.get("CommonPrefixes", [])] if k > prefix + start]
            key = min(found, default=None)
            return None if key is None or (rel_upto is not None and key > rel_upto) else key

        cuts = cut_points(last, rel_upto, _levels(first, last, _alphabet(names, prefix), next_key))
        rest = (names[-1], *(prefix + c for c in cuts))
    return RangeListing(objects, subfolders, rest)


def _ascending(items: list[tuple]) -> bool:
    return all(a[0] < b[0] for a, b in zip(items, items[1:]))


def _levels(first: str, last: str, alphabet: str, next_key) -> list[tuple[int, str]]:
    """The positions of `last` to cut at, descending, each with its sorted cut characters (the module docstring):
    d = the first position where `first` and `last` differ with the sampled `alphabet`, then the positions where
    `next_key(start)` (the first key after `start`, None if none in the range) finds keys branching off `last`."""
    d = len(os.path.commonprefix([first, last]))
    levels = [(d, alphabet)]
    p = d
    for _ in range(MAX_PROBES):
        key = next_key(last[:p] + LAST_CHAR) if p > 0 else None
        if key is None:
            return levels  # no key after the subtree of last[:p]: no cut below p
        q = len(os.path.commonprefix([key, last]))
        if q >= p:
            break  # a key under last[:p] past LAST_CHAR: the probes cannot tell; as unprobed below
        chars = alphabet if key[q] in alphabet else BROAD + alphabet
        levels.append((q, "".join(sorted({key[q], *(c for c in chars if c > key[q])}))))
        p = q
    return levels + [(position, alphabet) for position in range(p - 1, -1, -1)]


def cut_points(last: str, upto: str | None, levels: list[tuple[int, str]]) -> list[str]:
    """Ascending cut points in (last, upto) that split the rest of a range after `last` along the keys' trie (the
    module docstring): last[:p] + c for each (position p, sorted characters) of `levels`, p descending, and each c
    above last[p]."""
    cuts = [last[:p] + c for p, chars in levels for c in chars if c > last[p]]  # ascending
    if upto is not None:
        cuts = cuts[:bisect.bisect_left(cuts, upto)]
    if len(cuts) > MAX_SPLIT:
        cuts = [cuts[i * len(cuts) // MAX_SPLIT] for i in range(MAX_SPLIT)]
    return cuts


def _alphabet(names: list[str], prefix: str) -> str:
    """The characters seen at the positions that vary among the keys listed (from a sample of ~1,000 of them):
    digits for numbered keys (not the letters of a constant ".jpg"), 0-9a-f for hashes. A cut at a character
    no key has is an empty range, one wasted request."""
    sample = [n[len(prefix):] for n in names[:: max(1, len(names) // 1000)] + names[-1:]]
    seen: dict[int, set[str]] = {}
    for name in sample:
        for p, c in enumerate(name):
            seen.setdefault(p, set()).add(c)
    return "".join(sorted(set().union(*(chars for chars in seen.values() if len(chars) > 1))))
