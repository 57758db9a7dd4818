"""The one ``/proc/<pid>/stat`` parser (pure part, and this process read live)."""

from __future__ import annotations

import os

import pytest

from ipc.procstat import ProcStat, all_pids, parse_proc_stat, read_proc_stat


def test_comm_with_spaces_and_parentheses() -> None:
    fields = ["S", "1", "4242", "4242"] + ["0"] * 15 + ["987654"] + ["0"] * 30
    data = b"1234 (a) (b c)) " + " ".join(fields).encode() + b"\n"
    assert parse_proc_stat(data) == ProcStat(state="S", pgrp=4242, session=4242, start_time=987654)


def test_zombie_state() -> None:
    fields = ["Z", "1", "7", "7"] + ["0"] * 15 + ["5"] + ["0"] * 30
    assert parse_proc_stat(b"9 (x) " + " ".join(fields).encode()).zombie


def test_truncated_line_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(b"9 (x) S 1")


def test_this_process() -> None:
    st = read_proc_stat(os.getpid())
    assert st is not None and not st.zombie and st.pgrp == os.getpgrp() and st.session == os.getsid(0)
    assert os.getpid() in all_pids()
    assert read_proc_stat(2**22 + 1) is None  # above pid_max: never a process
