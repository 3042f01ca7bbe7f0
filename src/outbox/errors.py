"""Every exception the framework raises, under one root: :class:`OutboxError`.

Driver and broker-client errors are wrapped where they cross an adapter boundary,
with a message that says what to do; the original stays available as ``__cause__``.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Root of all errors raised by outbox."""


class ConfigurationError(OutboxError):
    """The framework was set up wrongly (bad URL, missing table, bad option)."""


class MessageError(OutboxError):
    """A message could not be built from the call's arguments."""


class DuplicateMessageError(MessageError):
    """A message with this id was already written: ids name messages, so reusing one
    would make the consumer drop the second message as a duplicate."""


class DecodeError(OutboxError):
    """A received payload is not a valid message; it is dead-lettered with this reason."""


class PublishError(OutboxError):
    """A transport refused or failed to publish a message."""


class BrokerUnavailableError(PublishError):
    """The broker could not be reached; the message may be retried later."""


class TransactionRolledBack(OutboxError):
    """The local transaction was rolled back, so no message was sent.

    Raised by a decorated function when the listener answered ROLLBACK without an
    exception of the user's own to re-raise.
    """


class TransactionOutcomeUnknown(OutboxError):
    """The local transaction's outcome could not be settled at once.

    The message is neither lost nor duplicated: the broker's check-back settles it.
    """


class MisuseError(OutboxError):
    """The framework's API was used in a way that would break its promise: committing,
    rolling back or closing the session the framework owns, a sync decorator on a
    coroutine, a nested call that cannot join the open transaction. Nothing of the
    call is committed."""


class MissingTableError(ConfigurationError):
    """A table the framework needs does not exist in the database: create it (``outbox
    migrate``). A consumer stops on it rather than take the database for down."""
