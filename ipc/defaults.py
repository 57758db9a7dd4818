"""Every default timeout and choice turnstile ships with, in one place.

The broker's config, the scheduler, the ``turnstile`` command and the clients
all read their defaults from here, so ``--help``, the library and the docs
cannot disagree. It lives in ``ipc`` because both the broker and the clients
import from ``ipc`` and from nothing above it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The agent ``turnstile serve`` runs unless told otherwise: the real Claude Code CLI.
AGENT = "claude"
#: The session a command or client uses unless told otherwise.
SESSION = "default"
#: How long an interrupted turn may take to end before the agent is killed and resumed.
DRAIN_TIMEOUT_S = 5.0
#: How long a ``set_model`` may wait for its control response before the agent is restarted on the model.
MODEL_TIMEOUT_S = 10.0
#: A lease with no request for this long ends.
LEASE_IDLE_S = 30.0
#: A (re)started agent must print its first turn's ``system/init`` this soon, or the start failed.
AGENT_START_TIMEOUT_S = 60.0
#: While the agent cannot be started, no request waits longer than this: it ends ``agent_unavailable``.
AGENT_UNAVAILABLE_TIMEOUT_S = 30.0
#: Back-off between failed agent starts: doubles from the first value up to the second.
SPAWN_BACKOFF_S = 0.25
SPAWN_BACKOFF_MAX_S = 5.0
#: Connections one client process may hold at once; each costs a POSIX queue of the user's budget
#: (``queues_max`` is 256 system-wide by default), so one process cannot take them all.
MAX_CLIENTS_PER_PROCESS = 64
#: How long a client waits for a broker to appear when it connects.
CONNECT_TIMEOUT_S = 5.0
#: How long a client waits for a new broker after the one it used died.
RECONNECT_TIMEOUT_S = 30.0
#: How long a client waits for room in a full request queue before ``QueueFull``.
SEND_TIMEOUT_S = 5.0
#: The kind ``turnstile prompt`` submits as: a quick shell test must not preempt the worker.
PROMPT_KIND = "worker"


def default_state_dir() -> Path:
    """Where brokers keep session state (and their lock, which clients probe when a broker is out of reach).

    ``$TURNSTILE_STATE_DIR``, else ``$XDG_STATE_HOME/turnstile``, else ``~/.local/state/turnstile``.
    """
    explicit = os.environ.get("TURNSTILE_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "turnstile"
