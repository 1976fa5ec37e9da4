"""The `--features` argument of the commands that work on chosen features of a basis.

Either feature ids ("3,17,40") or "top:N", the N highest by a ranking the command names
(feature-patch: a diffs column; feature-lineage and dashboards: energy at the step).
"""

from __future__ import annotations

from dataclasses import dataclass

from featurestore.errors import FeaturestoreError


@dataclass(frozen=True)
class FeatureIds:
    ids: list[int] | None = None  # the ids given, sorted, each in range
    top: int | None = None  # N of "top:N"


def parse_features(text: str, basis: str, n_features: int,
                   flag: str = "--features") -> FeatureIds:
    """Parse `text` for a basis with `n_features` features; an error names `flag` and the fix."""
    stripped = text.strip()
    if stripped.startswith("top:"):
        count = stripped[4:]
        if not count.isdigit() or int(count) < 1:
            raise FeaturestoreError(f"{flag} {text!r}: top:N needs a positive N")
        return FeatureIds(top=int(count))
    try:
        chosen = sorted({int(part) for part in stripped.split(",")})
    except ValueError:
        raise FeaturestoreError(f"{flag} {text!r}: give feature ids (3,17,40) or top:N") from None
    outside = [f for f in chosen if not 0 <= f < n_features]
    if outside:
        raise FeaturestoreError(
            f"{flag}: feature id {', '.join(map(str, outside))} is out of range; basis {basis} "
            f"has features 0..{n_features - 1}")
    return FeatureIds(ids=chosen)
