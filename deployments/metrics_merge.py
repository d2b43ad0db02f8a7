"""Merge Prometheus text expositions of several Ray nodes into one valid exposition."""

from __future__ import annotations

from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families


class _StaticCollector:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


def merge_prometheus_texts(texts: list[str], prefixes: tuple[str, ...]) -> bytes:
    """Keep the families whose name starts with one of ``prefixes`` and merge same-name families.

    Each node exports its own replicas' samples (labelled by replica and node), so merging is a union
    of samples; a family must appear once in an exposition, hence the regrouping.
    """
    merged: dict[str, Metric] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(prefixes):
                continue
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
            target.samples.extend(family.samples)
    return generate_latest(_StaticCollector(list(merged.values())))  # type: ignore[arg-type]
