"""The fixed-bucket histograms of the state block (pure parts)."""

from __future__ import annotations

from ipc import histogram, state


def test_observe_counts_cumulatively_and_sums() -> None:
    h = histogram.Histogram("turn_ms")
    for v in (5, 10, 11, 2_000_000):
        h.observe(v)
    bounds = histogram.BOUNDS["turn_ms"]
    # 5 and 10 fall in le=10; 11 in le=50; 2e6 only in +Inf.
    assert h.buckets[bounds.index(10)] == 2
    assert h.buckets[bounds.index(50)] == 3
    assert h.buckets[-2] == 3
    assert h.count == 4
    assert h.total == 5 + 10 + 11 + 2_000_000
    assert h.buckets == sorted(h.buckets)


def test_units() -> None:
    assert histogram.unit_seconds("queue_wait_ms") == 1e-3
    assert histogram.unit_seconds("preempt_signal_us") == 1e-6


def test_record_round_trip_keeps_histograms_and_label() -> None:
    rec = state.StateRecord(holder_label="pr-webhook")
    rec.histograms["handoff_us"].observe(300)
    back = state._unpack(state._RECORD.unpack(state._RECORD.pack(*state._pack(rec))))
    assert back.holder_label == "pr-webhook"
    assert back.histograms["handoff_us"] == rec.histograms["handoff_us"]
    assert back.histograms["turn_ms"].count == 0


def test_a_record_without_the_tail_reads_as_empty_histograms() -> None:
    """A block written by a broker that predates the histograms: its tail is zeros."""
    rec = state.StateRecord(broker_pid=7, holder_kind="worker")
    raw = bytearray(state._RECORD.pack(*state._pack(rec)))
    tail = (len(histogram.NAMES) * histogram.WORDS) * 8 + 32
    raw[len(raw) - tail :] = bytes(tail)
    back = state._unpack(state._RECORD.unpack(bytes(raw)))
    assert back.broker_pid == 7 and back.holder_kind == "worker"
    assert all(h.count == 0 and h.total == 0 for h in back.histograms.values())
    assert back.holder_label == ""
