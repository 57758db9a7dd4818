"""The sequence words the broker writes through a descriptor (pure: no IPC objects)."""

from __future__ import annotations

import random

from ipc import shm


def _bytes_changed(a: int, b: int) -> int:
    return sum((a >> (8 * j)) & 0xFF != (b >> (8 * j)) & 0xFF for j in range(8))


def _steps() -> list[int]:
    rng = random.Random(13)
    # Every carry out of every byte (the steps a plain counter would write in pieces),
    # the first 20,000 steps, random ones and the wrap at 2**64.
    carries = [k * 256**j + d for j in range(1, 8) for k in (1, 2, 255) for d in range(-3, 3)]
    return [*range(20_000), *carries, *(rng.getrandbits(64) for _ in range(5_000)), (1 << 64) - 2]


def test_consecutive_sequence_codes_differ_in_one_byte() -> None:
    for n in _steps():
        assert _bytes_changed(shm.seq_code(n), shm.seq_code(n + 1)) == 1, n


def test_a_sequence_code_decodes_to_its_step_and_its_parity() -> None:
    for n in _steps():
        code = shm.seq_code(n)
        assert shm.seq_step(code) == n
        assert shm.seq_odd(code) == bool(n & 1)
    assert shm.seq_code(0) == 0  # a fresh, all-zero segment is at step 0: stable, slot 0
