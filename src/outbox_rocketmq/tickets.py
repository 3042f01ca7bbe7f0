"""The tickets of a sent half message: its transaction-log row goes into the local
transaction, and its end-transaction follows the outcome."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Any

from outbox.log import get_logger
from outbox.message import Message, TransactionState
from outbox.transaction import TransactionLogTicket

if TYPE_CHECKING:
    from .producer import RocketMQTransactionalProducer

log = get_logger("outbox.rocketmq")


class HalfMessageTicket(TransactionLogTicket):
    """A sent half message in a local transaction of a sync :class:`outbox.Outbox`: its
    log row is written inside, and the half message is committed or rolled back to
    match the outcome. An unknown outcome leaves it to the broker's check-back."""

    __slots__ = ("adapter", "guarded", "outbox", "transaction")

    def __init__(self, adapter: RocketMQTransactionalProducer, outbox: Any, message: Message,
                 transaction: Any, guard_until: dt.datetime | None) -> None:
        super().__init__(outbox.listener, message, guard_until)
        self.adapter = adapter
        self.outbox = outbox
        self.transaction = transaction
        self.guarded = guard_until is not None

    def committed(self) -> None:
        self.adapter._follow_up(self, TransactionState.COMMIT)

    def rolled_back(self) -> None:
        self.adapter._follow_up(self, TransactionState.ROLLBACK)

    def unknown(self) -> BaseException | None:
        log.warning("rocketmq_transaction_left_to_check_back", **self.message.log_fields())
        return super().unknown()


class AsyncHalfMessageTicket(HalfMessageTicket):
    """The same in an :class:`outbox.AsyncOutbox`'s transaction: the end-transaction
    (and the guard settle) are scheduled as tasks of ``loop``, never run inline."""

    __slots__ = ("loop",)

    def __init__(self, adapter: RocketMQTransactionalProducer, outbox: Any, message: Message,
                 transaction: Any, guard_until: dt.datetime | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(adapter, outbox, message, transaction, guard_until)
        self.loop = loop

    def committed(self) -> None:
        self.adapter._schedule(self, TransactionState.COMMIT)

    def rolled_back(self) -> None:
        self.adapter._schedule(self, TransactionState.ROLLBACK)
