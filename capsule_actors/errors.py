"""One exception family: everything the runtime raises derives from CapsuleError."""

from __future__ import annotations


class CapsuleError(Exception):
    """Root of every error raised by capsule_actors."""


class ConfigError(CapsuleError, ValueError):
    """A declaration or argument is invalid (bad lock template, cron, option value...)."""


class SerializationError(CapsuleError):
    """A payload cannot be pickled/unpickled or exceeds max_payload_bytes."""


class NotRunning(CapsuleError):
    """No supervisor is running for the state directory."""


class KeyRefused(NotRunning):
    """A supervisor over TCP refused this peer's CURVE handshake: its key is not authorized
    there, or the server key it was given is not that supervisor's."""


class AlreadyRunning(CapsuleError):
    """Another supervisor already holds the state directory's pid lock."""


class StateDirError(CapsuleError):
    """The state directory cannot be created, locked or written safely."""


class StoreFull(StateDirError):
    """The task store's file system is (nearly) full: new tasks are refused until space is freed;
    the tasks already accepted go on, and nothing acknowledged is lost."""


class StoreUnavailable(CapsuleError):
    """The task store's server could not be reached for longer than the supervisor waits for it
    (PostgreSQL): the supervisor stops; nothing it acknowledged is lost."""


class Fenced(CapsuleError):
    """This cluster member's lease ran out (it was frozen, or cut off from the store) and another
    member may have taken over its work: it writes nothing more, stops its actors and rejoins
    as a new incarnation."""


class UnknownTask(CapsuleError, KeyError):
    """A task name or task id that the runtime does not know."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Backpressure(CapsuleError):
    """The runtime holds max_queued live tasks already; the submit recorded nothing."""


class LockConflict(CapsuleError):
    """A submit with on_conflict="reject" found a live task holding the lock key."""


class ProtocolError(CapsuleError):
    """A message header failed validation; its payload was never unpickled."""


class TaskError(CapsuleError):
    """Base of the ways a task attempt can end other than with its own exception."""


class TaskFailed(TaskError):
    """The task raised an exception that could not be transported back as itself."""

    def __init__(self, message: str, error_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.remote_traceback = remote_traceback


class TaskCancelled(TaskError):
    """The task was cancelled before or while it ran."""


class WorkerCrashed(TaskError):
    """The actor process running the task died and no retry remained."""


class TaskTimeout(TaskError, TimeoutError):
    """An attempt ran past the task's timeout."""


class CapsuleInternalError(CapsuleError):
    """A bug in capsule_actors itself: please report it."""


class RemoteTraceback(Exception):
    """Carries the traceback text of a task's exception, attached as its __cause__."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text


def error_from_reply(body: list[str]) -> CapsuleError:
    """The supervisor's error reply ``[type_name, message]`` as the exception it names (one of
    ours; anything else becomes a CapsuleInternalError)."""
    name, message = str(body[0]), str(body[1])
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, CapsuleError)):
        cls = CapsuleInternalError
    return cls(message)
