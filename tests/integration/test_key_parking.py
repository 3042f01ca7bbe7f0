"""Per-key order across a dead row: the dead row parks its key until it is replayed
(then it leaves first, the rows behind it after) or discarded (then the rest flows)."""

from __future__ import annotations

from typing import Any

import pytest
import tenacity
from sqlalchemy import Engine, update

from outbox import ConfigurationError, Message, RelayConfig
from outbox.schema import DEAD, DISCARDED, PENDING, SENT, outbox_messages
from outbox.storage import ParkedKey, counts, discard_dead, list_parked_keys, replay_dead

from .helpers import BatchRecordingPublisher, RecordingPublisher, add_messages, outbox_row
from .models import Model

ALWAYS = 10**9


def do(model: Model, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A relay method of either model, run to its end."""
    return model.run(lambda: model.call(fn, *args, **kwargs))


def msg(message_id: str, key: str | None = None) -> Message:
    return Message(topic="transfers", id=message_id, key=key, payload=message_id.encode())


def relay_for(model: Model, publisher: RecordingPublisher, batch_size: int = 100) -> Any:
    return model.relay(
        model.publisher(publisher),
        config=RelayConfig(max_attempts=1, batch_size=batch_size, backoff=tenacity.wait_fixed(0)),
    )


def parked(engine: Engine, limit: int = 100) -> list[ParkedKey]:
    with engine.connect() as conn:
        return list_parked_keys(conn, limit)


def status_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return counts(conn)


def of_key(publisher: RecordingPublisher, key: str) -> list[str]:
    return [m.id for m in publisher.published if m.key == key]


def park_a1(model: Model, engine: Engine, publisher: RecordingPublisher) -> Any:
    """A1 dies; A2 and A3 (same key) wait; B1, B2 and the keyless N1 flow."""
    relay = relay_for(model, publisher)
    add_messages(engine, [msg("A1", "A"), msg("A2", "A"), msg("B1", "B"), msg("N1")])
    assert do(model, relay.run_once).dead == 1
    assert outbox_row(engine, "A1").status == DEAD
    add_messages(engine, [msg("A3", "A"), msg("B2", "B"), msg("N2")])
    do(model, relay.drain, timeout=10)
    return relay


@pytest.mark.parametrize("publisher_type", [RecordingPublisher, BatchRecordingPublisher])
def test_a_dead_row_holds_its_key_and_only_its_key(
    model: Model, engine: Engine, publisher_type: type[RecordingPublisher]
) -> None:
    publisher = publisher_type(failures={"A1": ALWAYS})
    relay = park_a1(model, engine, publisher)
    assert publisher.ids() == ["B1", "N1", "B2", "N2"]
    assert do(model, relay.run_once).claimed == 0  # A2 and A3 are not even claimed
    assert (outbox_row(engine, "A2").status, outbox_row(engine, "A3").status) == (PENDING, PENDING)
    assert outbox_row(engine, "A2").attempts == 0
    assert status_counts(engine) == {PENDING: 2, SENT: 4, DEAD: 1, DISCARDED: 0}


def test_rows_behind_a_parked_key_do_not_starve_other_keys(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    relay = relay_for(model, publisher, batch_size=5)
    add_messages(engine, [msg("A1", "A")])
    assert do(model, relay.run_once).dead == 1
    add_messages(engine, [msg(f"A{i}", "A") for i in range(2, 14)])
    add_messages(engine, [msg("B1", "B"), msg("N1"), msg("C1", "C")])
    assert do(model, relay.run_once).published == 3  # one batch: the 12 waiting rows are not in it
    assert publisher.ids() == ["B1", "N1", "C1"]


def test_replay_publishes_the_dead_row_first_then_the_rows_behind_it(
    model: Model, engine: Engine
) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    relay = park_a1(model, engine, publisher)
    publisher.failures.clear()
    assert do(model, relay.replay, ["A1"]) == 1
    do(model, relay.drain, timeout=10)
    assert of_key(publisher, "A") == ["A1", "A2", "A3"]
    assert publisher.counts()["A1"] == 1
    assert parked(engine) == []
    assert status_counts(engine) == {PENDING: 0, SENT: 7, DEAD: 0, DISCARDED: 0}


def test_a_replayed_row_that_fails_again_parks_its_key_again(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    relay = park_a1(model, engine, publisher)
    assert do(model, relay.replay) == 1
    assert do(model, relay.run_once).dead == 1
    do(model, relay.drain, timeout=10)
    assert of_key(publisher, "A") == []
    assert parked(engine) == [ParkedKey("A", ("A1",), 2)]


def test_discard_lets_the_rest_of_the_key_flow_and_keeps_the_row(
    model: Model, engine: Engine
) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    relay = park_a1(model, engine, publisher)
    with engine.begin() as conn:
        assert discard_dead(conn, ["A1", "B1", "no-such-id"]) == 1  # B1 is sent, not dead
    do(model, relay.drain, timeout=10)
    assert of_key(publisher, "A") == ["A2", "A3"]
    row = outbox_row(engine, "A1")
    assert (row.status, row.sent_at) == (DISCARDED, None)
    assert row.last_error == "BrokerUnavailableError: injected failure for A1"
    assert status_counts(engine) == {PENDING: 0, SENT: 6, DEAD: 0, DISCARDED: 1}
    # Discarded is final: neither a replay nor a later relay publishes it.
    publisher.failures.clear()
    assert do(model, relay.replay) == 0
    assert do(model, relay.drain, timeout=10) == 0
    assert "A1" not in publisher.ids()
    assert do(model, relay.dead) == []


def test_discard_needs_named_ids(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS})
    park_a1(model, engine, publisher)
    with engine.begin() as conn:
        assert discard_dead(conn, []) == 0
        with pytest.raises(ConfigurationError, match="list of message ids"):
            discard_dead(conn, "A1")
    assert outbox_row(engine, "A1").status == DEAD


def test_list_parked_keys_counts_the_rows_waiting_behind_each(model: Model, engine: Engine) -> None:
    publisher = RecordingPublisher(failures={"A1": ALWAYS, "C1": ALWAYS, "N0": ALWAYS})
    relay = relay_for(model, publisher)
    add_messages(engine, [msg("N0"), msg("C1", "C"), msg("A1", "A"), msg("B1", "B")])
    assert do(model, relay.run_once).dead == 3
    add_messages(
        engine,
        [
            msg("A2", "A"),
            msg("C2", "C"),
            msg("A3", "A"),
            msg("C3", "C"),
            msg("A4", "A"),
            msg("B2", "B"),
        ],
    )
    do(model, relay.drain, timeout=10)
    # A second dead row of C (as a row that died before parking existed would be).
    with engine.begin() as conn:
        conn.execute(
            update(outbox_messages).where(outbox_messages.c.message_id == "C3").values(status=DEAD)
        )
    # The keyless dead row parks nothing; C died first, so it comes first.
    assert parked(engine) == [ParkedKey("C", ("C1", "C3"), 1), ParkedKey("A", ("A1",), 3)]
    assert parked(engine, limit=1) == [ParkedKey("C", ("C1", "C3"), 1)]
    with engine.connect() as conn, pytest.raises(ConfigurationError, match="at least 1"):
        list_parked_keys(conn, 0)

    # Replaying C3 alone does not release C: C1 still holds it, and C3 waits behind it.
    publisher.failures.clear()
    with engine.begin() as conn:
        assert replay_dead(conn, ["C3"]) == 1
    do(model, relay.drain, timeout=10)
    assert of_key(publisher, "C") == []
    assert parked(engine)[0] == ParkedKey("C", ("C1",), 2)
    with engine.begin() as conn:
        assert replay_dead(conn, ["C1"]) == 1
    do(model, relay.drain, timeout=10)
    assert of_key(publisher, "C") == ["C1", "C2", "C3"]
    assert parked(engine) == [ParkedKey("A", ("A1",), 3)]
