"""Counters for every outcome (invariant 2), logged periodically and served as Prometheus text."""

from __future__ import annotations

from collections import Counter


class Metrics:
    """Named monotonic counters. Single-threaded: only the event loop increments them."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def prometheus(self) -> str:
        """The counters in Prometheus text exposition format."""
        lines = []
        for name, value in sorted(self.counts.items()):
            metric = f"mqtt_kafka_bridge_{name}_total"
            lines += [f"# TYPE {metric} counter", f"{metric} {value}"]
        return "\n".join(lines) + "\n"
