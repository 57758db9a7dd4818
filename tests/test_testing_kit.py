"""The test kit's shared pieces (pure parts): the directive syntax and the offline-CLI environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker import demo
from broker.testing.directives import scan_directives


def test_demo_gives_the_real_cli_a_private_tmpdir(tmp_path: Path) -> None:
    # The demo built its own copy of the offline environment and had lost
    # TMPDIR: the CLI's cc-socks socket then landed in the shared /tmp.
    with demo._offline_api("claude", tmp_path) as (env, api):
        assert api is not None
        assert env["ANTHROPIC_BASE_URL"] == api.url
        assert env["HOME"] == str(tmp_path)
        assert env["TMPDIR"] == os.path.join(str(tmp_path), "tmp")
        assert os.path.isdir(env["TMPDIR"])


def test_scan_reads_bare_and_valued_directives_in_order() -> None:
    text = "a [sim:hang] b [sim:turn_ms=50] [api:slow=5] [sim:chunks=3]"
    assert list(scan_directives(text, "sim")) == [("hang", None), ("turn_ms", "50"), ("chunks", "3")]
    assert list(scan_directives(text, "api")) == [("slow", "5")]


def test_scan_reads_a_json_value_whole() -> None:
    text = '[api:tool=Bash:{"command":"echo ][ \\" ]","n":[1,2]}] tail [api:hang]'
    assert list(scan_directives(text, "api")) == [
        ("tool", 'Bash:{"command":"echo ][ \\" ]","n":[1,2]}'),
        ("hang", None),
    ]


@pytest.mark.parametrize("text", ["[sim:", "[sim:]", "[sim:Hang]", "[sim:turn_ms=5", "[sim:x y]", "[sim:tool={]"])
def test_scan_leaves_malformed_text_alone(text: str) -> None:
    assert list(scan_directives(text, "sim")) == []


def test_both_fakes_parse_the_same_syntax() -> None:
    from broker.testing.fake_api import Directives
    from broker.testing.fake_api import parse_directives as api_directives
    from broker.testing.fake_cli.script import parse_directives as sim_directives

    text = "[sim:turn_ms=200] [api:slow=200] [sim:hang] [api:hang]"
    assert sim_directives(text) == {"turn_ms": "200", "hang": ""}
    assert api_directives(text) == Directives(slow_ms=200, hang=True)
