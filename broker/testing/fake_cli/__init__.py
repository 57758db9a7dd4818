"""A fake Claude Code CLI (the "sim") in ``-p`` stream-json mode, for tests and benchmarks.

Run it as ``python -m broker.testing.fake_cli -p --input-format stream-json
--output-format stream-json --verbose [--session-id ID | --resume=ID]
[--model M] [sim flags]``.  It speaks the wire protocol recorded in
``docs/claude-stream-json.md`` (one JSON object per line on stdin and stdout,
``system/init`` at every turn, nested ``control_response`` ids, ``result``
lines whose first key is not ``type``, one malformed input line kills it) with
no network, in a few milliseconds per turn.

Where the real CLI may do one of several things, the sim does the simplest:
a user message written while a turn runs is queued and answered by its own
later turn (the real CLI may also merge queued messages into one turn, or fold
them into the running one; ``--merge-queued`` imitates merging).

Per-prompt directives (anywhere in the prompt text; several may be combined)
script a turn, so one process can serve differently scripted turns.  Each has
a global flag that applies it to every turn; a directive overrides the flag:

``[sim:turn_ms=N]`` / ``--turn-ms N``
    Stream the reply over N ms as evenly spaced text blocks (one per 20 ms
    unless ``chunks`` says otherwise); stdin stays served meanwhile.  Like the
    real CLI without ``--include-partial-messages``, each block is printed as
    one assistant line once it is complete, and nothing while it streams: a
    block's text arrives evenly over its share of the N ms, and an interrupt
    landing mid-block prints the text streamed so far as one assistant line
    (``"aborted": true``) after the interrupt's reply.
``[sim:chunks=K]`` / ``--chunks K``
    Split the reply into K blocks, K assistant lines (padded with dots if it
    is shorter).  ``[sim:turn_ms=N] [sim:chunks=1]`` is one block streaming
    for N ms: no assistant line until it ends, or until an interrupt.
``[sim:hang]`` / ``--hang``
    The reply never comes (an API stream that stalls before any text): after
    ``system/init`` the turn prints nothing until it is interrupted.
``[sim:bytes=N]`` / ``--bytes N``
    The reply text is exactly N bytes (truncated or padded with dots).
``[sim:huge=N]`` / ``--huge N``
    Reply with one assistant line of exactly N bytes (newline excluded); the
    result line repeats the text, like the real CLI.
``[sim:tool]`` / ``--tool``; ``[sim:tool_ms=N]`` / ``--tool-ms N``
    A tool phase first: an assistant ``tool_use`` line, N ms of "running", a
    user ``tool_result`` line.  An interrupt in it ends with ``aborted_tools``
    (a rejected ``tool_result`` line, then the marker).
``[sim:permission]`` / ``--permission``
    A tool phase that first asks ``can_use_tool`` on stdout and waits for the
    ``control_response``; the reply says ``permission: allowed`` or
    ``permission: denied (MESSAGE)``.
``[sim:hook]`` / ``[sim:hook=EVENT]`` / ``--hook EVENT``
    A tool phase with hooks: for each callback id an ``initialize`` request
    registered for a tool event (``PreToolUse``, ``PostToolUse``; with
    ``=EVENT`` only EVENT) whose matcher matches ``Bash``, a
    ``hook_callback`` control request, each awaited; the reply says
    ``[hook: continue]``, ``[hook: blocked: REASON]`` or ``[hook: failed:
    ERROR]`` per answer, or ``[hook: none registered]``.  ``continue:
    false`` ends the turn after the tool (an empty result, ``hook_stopped``).
``[sim:error=api]`` (``api:CODE``, ``max_turns``, ``budget``) / ``--error K``
    End with the matching error result.
``[sim:ignore_interrupt]`` / ``--ignore-interrupts``
    Interrupts (and SIGINT) get no reply and no effect; the turn never ends.
``[sim:die]`` / ``--die``; ``[sim:die=MS]``
    Exit 1 without a result after streaming (or MS ms into the turn).
``[sim:garbage]`` / ``--garbage``
    Print a non-JSON line to stdout after ``system/init``, then go on.
``[sim:silent]`` / ``--silent``
    Stream, then never send a result (control requests are still answered).
``[sim:tool_child]`` / ``--tool-child``; ``[sim:tool_child=SECS]`` / ``--tool-child-secs``
    Fork a child (same process group, holding stdout) that sleeps SECS
    (default 600) seconds and exits, then exit 1 without a result.
``[sim:interrupt_ms=N]`` / ``--interrupt-ms N``
    Delay between an interrupt's reply and the interrupted result.
``[sim:history]``
    Append ``[history=N]`` to the reply, N being the number of earlier user
    messages in this session (resume keeps them).

Other sim flags: ``--sim-state-dir DIR`` (transcripts; default
``~/.sim-claude``), ``--stamp-file PATH``, ``--stats-file PATH`` (see
:mod:`broker.testing.fake_cli.stats`), ``--startup-ms N`` (stdin is not read for N ms after start),
``--set-model-ms N`` and ``--context-usage-ms N`` (delay those control
replies, so replies come out of order), ``--merge-queued``.

Behaviour copied from the real CLI (``claude-stream-json.md``, and the
CLI 2.1.330 binary where the notes are silent):

- Nothing is printed before the first input line, except the error result of
  an unknown ``--resume`` id, which comes at start-up, followed by exit 1.
- A uuid-stamped message gets ``command_lifecycle`` lines: ``queued`` on
  arrival, ``started`` before its ``system/init``, and after its result
  ``completed``, or ``cancelled`` when its turn was interrupted or aborted or
  ended in error, or when ``cancel_queued`` dropped it.  A repeated uuid is
  dropped silently (within one process only).  A uuid-stamped message whose
  content is neither a string nor a list (nor null) runs no turn and gets a
  lone ``completed`` (its uuid is not taken: it may be sent again).
- ``interrupt`` is answered ``{"still_queued": [...]}`` (plus ``cancelled``
  with ``cancel_queued``); a pending ``can_use_tool`` or ``hook_callback`` is withdrawn with
  ``control_cancel_request`` (before the reply).  A running turn then prints
  the partial text block, if one was streaming; if a tool was running or
  waiting for permission, a user ``tool_result`` line rejecting it
  (``is_error``); a user ``[Request interrupted by user]`` marker (``... for
  tool use]`` after a tool); and an ``error_during_execution`` result whose
  ``num_turns`` counts the marker (2 while streaming, 3 during a tool).
- A ``priority: "now"`` message aborts the running turn without a marker:
  while streaming, an ``error_during_execution`` result (``num_turns`` 1), or,
  when reply text had come, the partial block and a ``success`` result
  (``is_error`` false, ``terminal_reason`` ``aborted_streaming``) carrying
  that text; during a tool, the tool first finishes (a pending permission is
  withdrawn and its ``tool_result`` says so), then a ``success`` result with
  ``aborted_tools`` and empty text.  The message then runs as the next turn.
- ``set_model`` is preceded by an ``isReplay`` user line
  ``<local-command-stdout>Set model to `...`</local-command-stdout>`` when it
  changes the resolved model once a turn has begun; ``model: null`` (and
  ``"default"``) resets to the built-in default model (``DEFAULT_MODEL``,
  whatever ``--model`` said).  A running turn keeps its model.
- ``set_permission_mode`` is answered ``{"mode": MODE}``, followed by a
  ``system/status`` line when the mode changed.  Errors carry an
  ``error_code``: ``invalid_mode``, ``auto_mode_model`` (``auto`` with a
  4.5-generation model) or ``bypass_not_launched``.
- Results of the ``error_*`` subtypes carry ``errors`` and no ``result`` text.
- Stdin EOF: queued turns still run, then exit 1 if the last result was an
  error, else 0.  SIGTERM: exit 143 at once, no result.  SIGINT: the running
  turn's interrupted result, then exit 0.
- Transcripts live in ``<state dir>/<session id>.jsonl``; a turn's prompt is
  recorded when it starts, so a prompt killed mid-turn survives a
  ``--resume``.  ``--session-id`` refuses ("already in use") an id that has a
  transcript; ``--fork-session`` copies it under a new id.

Every directive and flag, with examples, is in docs/testing-kit.md.  The
modules: :mod:`.wire` (stdout lines), :mod:`.argv` (command line),
:mod:`.script` (directives, the turn in flight), :mod:`.transcript`
(sessions), :mod:`.stats` (what a test observes), :mod:`.control` (control-request
replies), :mod:`.cli` (the process).
Nothing is imported here: the package is loaded at every start-up.
"""

