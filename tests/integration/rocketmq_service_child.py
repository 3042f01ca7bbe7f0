"""One producing service in a process of its own, for the two-services test: every
end-transaction call is lost, so the broker's check-backs decide every outcome.

    python rocketmq_service_child.py DB_URL NAMESRV GROUP TOPIC PREFIX COUNT

It places orders PREFIX-0 .. PREFIX-(COUNT-1) (every third one fails, so it rolls
back), prints "READY", then answers check-backs until its stdin closes, printing one
JSON line per check-back it answered: {"topic", "message_id", "answer"}.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rocketmq_support import LosesEndTransaction, make_service

from outbox.message import TransactionState
from outbox_rocketmq import RocketMQConfig
from outbox_rocketmq.mapping import MESSAGE_ID_PROPERTY

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


class Answering(LosesEndTransaction):
    """Says what it answered to every check-back."""

    def _answer(self, received: Any, tag: str | None) -> TransactionState:
        state = super()._answer(received, tag)
        say(json.dumps({"topic": received.topic, "answer": state.value,
                        "message_id": received.properties.get(MESSAGE_ID_PROPERTY)}))
        return state


def main() -> None:
    db_url, namesrv, group, topic, prefix, count = sys.argv[1:7]
    adapter = Answering(RocketMQConfig(namesrv=namesrv, producer_group=group), [topic])
    service = make_service(db_url, adapter, topic)
    adapter.start()
    for i in range(int(count)):
        with contextlib.suppress(ValueError):  # refused: rolled back locally
            service.place_order(f"{prefix}-{i}", fail=i % 3 == 2)
    say("READY")
    sys.stdin.read()  # until the parent is done
    adapter.close()


if __name__ == "__main__":
    main()
