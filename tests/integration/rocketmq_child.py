"""A producer process that dies by SIGKILL at a chosen point of the send path.

    python rocketmq_child.py DB_URL ENDPOINTS TOPIC ORDER_NO POINT [guard]

POINT is after-half-send or after-local-commit; "guard" turns on a 1 s guard row.

It prints "KILLING" just before it kills itself, so the parent can time the crash.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rocketmq_support import make_service

from outbox_rocketmq import RocketMQConfig, RocketMQTransactionalProducer


def die() -> None:
    print("KILLING", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class DiesBeforeEndTransaction(RocketMQTransactionalProducer):
    def _end(self, transaction: Any, state: Any, message: Any) -> bool:
        die()  # the local transaction committed; the commit of the half message never goes
        return False


def main() -> None:
    db_url, endpoints, topic, order_no, point = sys.argv[1:6]
    guard = dt.timedelta(seconds=1) if sys.argv[6:] == ["guard"] else None
    config = RocketMQConfig(endpoints)
    if point == "after-local-commit":
        adapter: RocketMQTransactionalProducer = DiesBeforeEndTransaction(
            config, [topic], guard_after=guard)
        service = make_service(db_url, adapter, topic)
        service.place_order(order_no)
    elif point == "after-half-send":
        adapter = RocketMQTransactionalProducer(config, [topic], guard_after=None)
        service = make_service(db_url, adapter, topic)
        # The half message is out; die before the local transaction can commit.
        original = adapter.prepare

        def prepare(outbox: Any, message: Any) -> Any:
            ticket = original(outbox, message)
            die()
            return ticket

        adapter.prepare = prepare  # type: ignore[method-assign]
        service.place_order(order_no)
    else:
        raise SystemExit(f"unknown crash point {point}")
    raise SystemExit("the process should have died")


if __name__ == "__main__":
    main()
