"""What ``Client`` and ``AsyncClient`` (and their turns) share above the connection: all but waiting."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, Self, TypeVar

from clients import handlers
from clients.core import Connection, HookHandler, PermissionHandler
from clients.requests import RequestState, TurnResult
from ipc import defaults, frames

if TYPE_CHECKING:
    from clients.fleet_conn import FleetOptions

TurnT = TypeVar("TurnT", bound="BaseTurn")


class Link(Protocol):
    """A client's link to the session, local or remote: the client's id and the broker incarnation it sees."""

    client_id: str
    incarnation: str


class TrackedRequest(Protocol):
    """A client's record of one request, local or remote: its id and the broker's turn id."""

    req: str
    turn: int


class BaseClient(Generic[TurnT]):
    """The constructor, identity and request-building half of both clients; subclasses add waiting.

    ``label`` (1-32 of ``A-Z a-z 0-9 _ . : @ / + -``) names the client in
    ``turnstile status`` instead of its hex id.
    """

    #: ``"module:Class"`` of the remote subclass that ``nats=URL`` gives (None: this class is one).
    _remote_class: ClassVar[str | None] = None

    def __new__(cls, *args: Any, nats: str | FleetOptions | None = None, **kwargs: Any) -> Self:
        # With ``nats=URL`` the same constructor gives the remote client, a subclass whose
        # __init__ then runs with these arguments: one hook, the local path untouched.
        if nats is not None and cls._remote_class is not None:
            module, _, name = cls._remote_class.partition(":")
            remote: type[Self] = getattr(importlib.import_module(module), name)
            return object.__new__(remote)
        return object.__new__(cls)

    def __init__(
        self,
        session: str = defaults.SESSION,
        kind: frames.Kind = "worker",
        *,
        connect_timeout_s: float = defaults.CONNECT_TIMEOUT_S,
        reconnect_timeout_s: float = defaults.RECONNECT_TIMEOUT_S,
        on_preempt: frames.OnPreempt = "requeue",
        on_permission: PermissionHandler | None = None,
        on_hook: HookHandler | None = None,
        label: str | None = None,
        nats: str | FleetOptions | None = None,
    ) -> None:
        # With ``nats``, ``BaseClient.__new__`` made this a remote client: its ``_open`` takes it.
        self.session = session
        self.kind = kind
        self.on_preempt: frames.OnPreempt = on_preempt
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._open(on_permission=on_permission, on_hook=on_hook, label=label, nats=nats)

    def _open(self, *, on_permission: PermissionHandler | None, on_hook: HookHandler | None, label: str | None,
              nats: str | FleetOptions | None) -> None:
        """Make the link to the session: here the local connection (the remote clients' is over NATS)."""
        self._conn = Connection(self.session, self.kind, on_permission=on_permission, on_hook=on_hook, label=label)
        self._setup()

    def _setup(self) -> None:
        """What a front end does once the link exists (the blocking client attaches here)."""

    def _link(self) -> Link:
        """What holds this client's identity (a remote client's is its NATS core)."""
        return self._conn

    @property
    def client_id(self) -> str:
        """This client's id."""
        return self._link().client_id

    @property
    def incarnation(self) -> str:
        """The incarnation id of the broker this client is attached to (empty for a remote client)."""
        return self._link().incarnation

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Around every call into the connection: the blocking client refuses a second thread here."""
        yield

    def _turn(self, st: RequestState) -> TurnT:
        """The front end's turn object for a request."""
        raise NotImplementedError

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel a turn by (incarnation, turn id), whoever holds it."""
        with self._exclusive():
            self._conn.cancel_turn(incarnation, turn)

    def prompt(
        self,
        content: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        on_preempt: frames.OnPreempt | None = None,
        resume_prompt: str | None = None,
        request_id: str | None = None,
    ) -> TurnT:
        """Submit a prompt; returns with its turn (iterate it for events, ask it for the result).

        A local client and the remote ``AsyncClient`` return at once (``await turn.submitted()`` waits
        until NATS stored the request); the remote blocking ``Client`` returns once NATS stored it.
        """
        return self._submit_prompt(content, model=model, on_preempt=on_preempt or self.on_preempt,
                                   resume_prompt=resume_prompt, request_id=request_id)

    def _submit_prompt(self, content: str | list[dict[str, Any]], **options: Any) -> TurnT:
        """Send a prompt with the options of :meth:`prompt` (its ``on_preempt`` resolved)."""
        with self._exclusive():
            return self._turn(self._conn.prompt(content, **options))


class BaseTurn:
    """A submitted request's identity, cancel and outcome; subclasses add waiting for it."""

    def __init__(self, client: BaseClient[Any], st: RequestState) -> None:
        self._client = client
        self._conn = client._conn
        self._st = st

    def _ids(self) -> TrackedRequest:
        """What knows this request's ids (a remote turn tracks its request elsewhere)."""
        return self._st

    @property
    def request_id(self) -> str:
        """The id this request travels under (stable across broker restarts; collect the result with it)."""
        return self._ids().req

    @property
    def turn_id(self) -> int:
        """The broker's turn id once the turn started (0 before)."""
        return self._ids().turn

    def cancel(self) -> None:
        """Cancel this request only (whichever turn runs it; a no-op once it ended)."""
        with self._client._exclusive():
            if not self._st.done:
                self._conn.cancel(self._st)

    def _outcome(self) -> TurnResult:
        """The ended request's result; raises :class:`~clients.handlers.HandlerError` if a handler failed in it."""
        res = self._st.result
        assert res is not None, "only called once the request ended"
        if self._st.handler_failures:
            raise handlers.error_for(self._st.handler_failures, res)
        return res
