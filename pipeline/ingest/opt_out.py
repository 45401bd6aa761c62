"""A web server's opt-out sent with an image: the X-Robots-Tag response header.

Sites that do not want their images in AI training sets say so per response: `X-Robots-Tag: noai, noimageai`
(DeviantArt introduced them in 2022; ArtStation's terms forbid the download for ML training where `noai` is set),
or `noindex` / `noimageindex`, the search engines' older directives (`none` is `noindex, nofollow`). img2dataset
skips such responses by default (`--disallowed_header_directives`, the same four); so does this tool
(`--opt-out-directives`, tools/shard.py), checked from the headers before the body is read: an opted-out image
costs its response headers, not its bytes, and becomes the reject "opted_out" with the header's value.

A directive counts when it is addressed to every agent or to ours (`canvit-ingest: noai`), not when it names
another agent (`googlebot: noindex`). Robots.txt is not read (neither does img2dataset): it governs crawling pages,
and a URL dump is not crawled.
"""

from __future__ import annotations

AGENT = "canvit-ingest"  # the product token of USER_AGENT: what an X-Robots-Tag rule names to address this tool
USER_AGENT = f"{AGENT}/0.1 (+tools/shard.py)"
DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # honoured unless configured otherwise: img2dataset's
# Directives whose value follows a colon (Google's list): "unavailable_after: 25 Jun 2010" names no agent.
_VALUED = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})
_SHORTHANDS = {"none": ("noindex", "nofollow")}  # Google's: "none" is both


def check_directives(directives: tuple[str, ...]) -> None:
    """Raises ValueError naming a directive that could never match one parsed from a header."""
    for d in directives:
        if not d or d != d.strip().lower() or any(c in d for c in ",: \t"):
            raise ValueError(f"opt-out directive {d!r}: lower-case, without spaces, commas or colons")


def opted_out(values: list[str], directives: frozenset[str]) -> str | None:
    """The first X-Robots-Tag value (of the header's `values`, one per header line) that forbids this tool the image
    with one of `directives`, or None. A value is comma-separated rules; "agent: rule" addresses that agent, and the
    rules after it up to the next agent (Google's format); rules before any agent address every agent."""
    if not directives:
        return None
    for value in values:
        agent = None
        for part in value.split(","):
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name and name not in _VALUED and " " not in name:
                agent, part = name, rest
            rule = part.strip().lower()
            if agent in (None, AGENT) and not directives.isdisjoint(_SHORTHANDS.get(rule, (rule,))):
                return value
    return None
