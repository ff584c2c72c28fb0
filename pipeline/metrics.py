"""A run's progress as Ray metrics, so the Ray dashboard, Prometheus and Grafana show a running job.

The driver records each commit or failure record as it lands; Ray's metrics agent exports them
on the node's metrics port (`ray start --metrics-export-port`) with a `ray_` prefix:
`ray_strata_docs_total`, `ray_strata_tokens_total`, `ray_strata_quarantined_total`,
`ray_strata_fragments_total{state=committed|failed}`, `ray_strata_tokens_per_second` and
`ray_strata_rows_remaining`, each tagged with the run's `output`.
"""

from __future__ import annotations

import time

from pipeline.manifest import CommitRecord, FailureRecord


class RunMetrics:
    def __init__(self, output_uri: str, bytes_remaining: int):
        from ray.util.metrics import Counter, Gauge

        tags = ("output",)
        self.tags = {"output": output_uri}
        self.docs = Counter("strata_docs", "Documents embedded", tag_keys=tags)
        self.tokens = Counter("strata_tokens", "Tokens embedded", tag_keys=tags)
        self.quarantined = Counter("strata_quarantined", "Documents quarantined (bad input)", tag_keys=tags)
        self.fragments = Counter("strata_fragments", "Fragments finished, by state (committed, failed)",
                                 tag_keys=(*tags, "state"))
        self.rate = Gauge("strata_tokens_per_second", "Tokens per second since the run started", tag_keys=tags)
        self.remaining = Gauge("strata_bytes_remaining", "Input bytes of the shards not yet finished", tag_keys=tags)
        self.started = time.monotonic()
        self.tokens_so_far, self.bytes_remaining = 0, bytes_remaining
        self.remaining.set(bytes_remaining, tags=self.tags)

    def record(self, record: CommitRecord | FailureRecord, shard_size: int = 0) -> None:
        if isinstance(record, FailureRecord):
            self.fragments.inc(1, tags={**self.tags, "state": "failed"})
            return
        self.fragments.inc(1, tags={**self.tags, "state": "committed"})
        for counter, value in ((self.docs, record.embedded), (self.tokens, record.embedded_tokens),
                               (self.quarantined, record.quarantined)):
            if value:
                counter.inc(value, tags=self.tags)
        self.tokens_so_far += record.embedded_tokens
        self.bytes_remaining -= shard_size if record.last else 0
        self.rate.set(self.tokens_so_far / max(time.monotonic() - self.started, 1e-9), tags=self.tags)
        self.remaining.set(max(self.bytes_remaining, 0), tags=self.tags)
