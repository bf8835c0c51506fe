"""Scans: first-order linear recurrences, real or complex, with resets and a cheap backward pass."""

from seqjax.scan.linear_recurrence import (
    SCAN_IMPLS,
    ScanImpl,
    linear_recurrence,
    segment_index,
    segment_starts,
)

__all__ = ["SCAN_IMPLS", "ScanImpl", "linear_recurrence", "segment_index", "segment_starts"]
