"""Baseline recommender: the most popular items the user has not seen yet."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class PopularityRecommender:
    version = "popularity-v1"

    def recommend(self, ranked_items: Sequence[str], seen: Iterable[str], k: int) -> list[str]:
        """Top ``k`` of ``ranked_items`` (most popular first) minus ``seen``.

        >>> PopularityRecommender().recommend(["a", "b", "c", "d"], {"b"}, 2)
        ['a', 'c']
        """
        seen_set = set(seen)
        out: list[str] = []
        for item in ranked_items:
            if item not in seen_set:
                out.append(item)
                if len(out) == k:
                    break
        return out
