"""The dashboard over HTTP (a real uvicorn on loopback), on SQLite, PostgreSQL and
MariaDB: listing with filters and keyset paging, details with the redaction hook,
the lookups, and the writes (token, CSRF, cross-site refusal, confirmation counts,
the log line)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event, select, update

from integration.dashboard_support import Seeded, seed, served
from integration.helpers import capture_events
from outbox import Message
from outbox.dashboard import create_app
from outbox.schema import outbox_messages

T = outbox_messages
TOKEN = "dashboard-token-for-tests"


def statuses(engine: Engine, ids: list[str]) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(select(T.c.message_id, T.c.status)
                                 .where(T.c.message_id.in_(ids))).all())


def listed(html: str) -> list[str]:
    """The message ids of a listing page, in its order."""
    table = html.split('id="messages"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'href="/db/0/messages/([^"]+)"', table)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', html)
    assert found, html
    return found.group(1)


@pytest.fixture
def seeded(engine: Engine) -> Seeded:
    return seed(engine)


@pytest.fixture
def client(engine: Engine, seeded: Seeded) -> Iterator[httpx.Client]:
    def redact(m: Message) -> Message:
        return dataclasses.replace(m, payload=re.sub(rb"4111-[0-9-]+", b"(card)", m.payload))

    with served(create_app([engine], token=TOKEN, redact=redact)) as url, \
            httpx.Client(base_url=url, timeout=10,
                                                  follow_redirects=True) as c:
        yield c


def sign_in(client: httpx.Client) -> str:
    r = client.post("/login", data={"token": TOKEN, "back": "/db/0/messages"})
    assert r.status_code == 200 and "outbox_dashboard_session" in client.cookies, r.text
    return csrf_of(r.text)


def test_the_listing_filters_by_status_topic_key_error_and_time(
    client: httpx.Client, seeded: Seeded,
) -> None:
    dead = listed(client.get("/db/0/messages", params={"status": "dead"}).text)
    assert dead == list(reversed(seeded.dead_timeout + seeded.dead_refused))  # newest first
    refund = listed(client.get("/db/0/messages",
                               params={"status": "dead", "topic": "bank-refund"}).text)
    assert refund == list(reversed(seeded.dead_refused))
    timeout = listed(client.get("/db/0/messages", params={"error": "timeout after"}).text)
    assert timeout == list(reversed(seeded.dead_timeout))
    keyed = listed(client.get("/db/0/messages", params={"key": "acct-parked"}).text)
    assert keyed == list(reversed([seeded.dead_refused[0], *seeded.waiting]))
    # "%" and "_" are text in the error filter, not wildcards.
    assert listed(client.get("/db/0/messages", params={"error": "%"}).text) == []
    recent = listed(client.get("/db/0/messages", params={"since": "2000-01-01",
                                                         "until": "2000-01-02"}).text)
    assert recent == []


def test_pages_follow_the_keyset_and_never_use_offset(
    engine: Engine, client: httpx.Client, seeded: Seeded,
) -> None:
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        seen: list[str] = []
        url = "/db/0/messages?limit=7"
        pages = 0
        while url:
            html = client.get(url).text
            seen += listed(html)
            pages += 1
            found = re.search(r'id="next" href="([^"]+)"', html)
            url = "/db/0/messages" + found.group(1).replace("&amp;", "&") if found else ""
    finally:
        event.remove(engine, "before_cursor_execute", record)
    everything = seeded.sent + seeded.dead_timeout + seeded.dead_refused + seeded.pending
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    assert pages == -(-len(everything) // 7)
    assert seen == sorted(seen, reverse=True)  # ids grow with seq here: newest first
    listings = [(s, p) for s, p in statements if "ORDER BY outbox_messages.seq DESC" in s]
    assert len(listings) == pages
    assert sum("outbox_messages.seq <" in s for s, _ in listings) == pages - 1  # the keyset
    # SQLite spells a bare LIMIT "LIMIT ? OFFSET ?" with 0; nothing is ever skipped.
    assert all("OFFSET" not in s or list(p)[-1] == 0 for s, p in listings)


def test_details_show_the_payload_headers_error_inbox_and_check_back(
    client: httpx.Client, seeded: Seeded,
) -> None:
    html = client.get(f"/db/0/messages/{seeded.dead_timeout[0]}").text
    assert "publish timeout after 5.0 s" in html
    assert "traceparent" in html and "outbox-created-at" in html
    payload = html.split('id="payload">', 1)[1].split("</pre>", 1)[0]
    assert "&#34;amount&#34;: &#34;10.00&#34;" in payload and "\n  " in payload  # indented
    assert "4111" not in html and "(card)" in html  # the redaction hook ran
    assert "<strong>ROLLBACK</strong>" in html  # no log row, older than the timeout
    logged = client.get(f"/db/0/messages/{seeded.logged}").text
    assert "<strong>COMMIT</strong>" in logged and "bank2" in logged


def test_lookups_answer_the_inbox_and_the_transaction_log(
    client: httpx.Client, seeded: Seeded,
) -> None:
    yes = client.get("/db/0/inbox", params={"group": "bank2", "message_id": seeded.logged})
    assert seeded.logged in yes.text.split('id="inbox"', 1)[1]
    no = client.get("/db/0/inbox", params={"group": "bank2", "message_id": seeded.pending[0]})
    assert 'id="inbox-none"' in no.text
    assert "<strong>COMMIT</strong>" in client.get(
        "/db/0/check", params={"message_id": seeded.logged}).text
    young = client.get("/db/0/check", params={"message_id": seeded.pending[0]}).text
    assert "<strong>UNKNOWN</strong>" in young  # younger than the timeout: may still commit
    assert "<strong>ROLLBACK</strong>" in client.get(
        "/db/0/check", params={"message_id": "never-written"}).text


def test_the_overview_counts_and_the_lag(client: httpx.Client, seeded: Seeded) -> None:
    html = client.get("/db/0").text
    assert re.search(r'id="dead">\s*<a [^>]*>6<', html), html
    assert re.search(r'id="parked">\s*<a [^>]*>5<', html)  # acct-parked, acct-t0..t3
    assert f'id="pending">{len(seeded.pending)}<' in html
    assert 'http-equiv="refresh"' in html
    assert "bank-refund" in html.split('id="backlog"', 1)[1]


def test_without_a_token_it_is_read_only(engine: Engine, seeded: Seeded) -> None:
    with served(create_app([engine])) as url, httpx.Client(base_url=url) as c:
        html = c.get("/db/0/messages", params={"status": "dead"}).text
        assert "read-only" in html and 'name="action"' not in html
        r = c.post("/db/0/act", data={"action": "replay", "id": seeded.dead_timeout[0]})
        assert r.status_code == 403 and "read-only" in r.text
        assert c.post("/login", data={"token": "anything"}).status_code == 403
    assert set(statuses(engine, seeded.dead_timeout).values()) == {"dead"}


def test_writes_need_the_token_a_csrf_value_and_the_same_origin(
    engine: Engine, client: httpx.Client, seeded: Seeded,
) -> None:
    target = seeded.dead_timeout[0]
    with capture_events() as events:
        wrong = client.post("/login", data={"token": "guess"})
        assert wrong.status_code == 403 and "outbox_dashboard_session" not in client.cookies
        assert client.post("/db/0/act", data={"action": "replay", "id": target,
                                              "confirmed": "yes"}).status_code == 403
        csrf = sign_in(client)
        no_csrf = client.post("/db/0/act", data={"action": "replay", "id": target,
                                                 "confirmed": "yes"})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
        cross = client.post("/db/0/act", headers={"Origin": "http://evil.example"},
                            data={"csrf": csrf, "action": "replay", "id": target,
                                  "confirmed": "yes"})
        assert cross.status_code == 403 and "another site" in cross.text
        assert statuses(engine, [target]) == {target: "dead"}
        ask = client.post("/db/0/act", data={"csrf": csrf, "action": "replay", "id": target})
        assert re.search(r"This will replay <strong>1</strong> dead row", ask.text), ask.text
        assert statuses(engine, [target]) == {target: "dead"}  # asked, not done
        done = client.post("/db/0/act", data={"csrf": csrf, "action": "replay", "id": target,
                                              "confirmed": "yes"})
        assert "Replay: 1 row changed" in done.text
    assert statuses(engine, [target]) == {target: "pending"}
    actions = [e for e in events if e.get("event") == "dashboard_action"]
    assert len(actions) == 1 and actions[0]["rows"] == 1 and actions[0]["action"] == "replay"
    assert any(e.get("event") == "dashboard_sign_in_refused" for e in events)
    assert not any(TOKEN in str(e) or "guess" in str(e) for e in events)


def test_a_bulk_action_by_filter_counts_first_and_touches_only_what_it_counted(
    engine: Engine, client: httpx.Client, seeded: Seeded,
) -> None:
    csrf = sign_in(client)
    form = {"csrf": csrf, "action": "discard", "scope": "filter", "error": "timeout"}
    ask = client.post("/db/0/act", data=form).text
    assert re.search(r"This will discard <strong>4</strong> dead rows", ask), ask
    upto = re.search(r'name="upto" value="(\d+)"', ask)
    assert upto
    # A row dies after the count: the confirmed action leaves it alone.
    late = seeded.pending[-1]
    with engine.begin() as conn:
        conn.execute(update(T).where(T.c.message_id == late)
                     .values(status="dead", last_error="timeout again"))
    done = client.post("/db/0/act", data={**form, "confirmed": "yes", "count": "4",
                                          "upto": upto.group(1)})
    assert "Discard: 4 rows changed" in done.text
    assert set(statuses(engine, seeded.dead_timeout).values()) == {"discarded"}
    assert statuses(engine, [late]) == {late: "dead"}
    assert set(statuses(engine, seeded.dead_refused).values()) == {"dead"}


def test_releasing_a_parked_key_discards_its_dead_rows_and_lets_the_rest_flow(
    engine: Engine, client: httpx.Client, seeded: Seeded,
) -> None:
    csrf = sign_in(client)
    parked = client.get("/db/0/parked").text
    row = parked.split(seeded.parked_key, 1)[1]
    assert re.search(r"<td>2</td>", row)  # two rows wait behind the dead one
    head = seeded.dead_refused[0]
    ask = client.post("/db/0/act", data={"csrf": csrf, "action": "release", "id": head})
    assert "This will release <strong>1</strong> dead row" in ask.text
    client.post("/db/0/act", data={"csrf": csrf, "action": "release", "id": head,
                                   "confirmed": "yes"})
    assert statuses(engine, [head]) == {head: "discarded"}
    assert set(statuses(engine, seeded.waiting).values()) == {"pending"}
    assert seeded.parked_key not in client.get("/db/0/parked").text


@pytest.mark.parametrize(("path", "status", "text"), [
    ("/db/0/messages?status=bogus", 400, "is not one of pending, sent, dead, discarded"),
    ("/db/0/messages?limit=0", 400, "limit must be from 1 to 500"),
    ("/db/0/messages?since=yesterday", 400, "is not a time"),
    ("/db/0/messages?after=x", 400, "is not a row number"),
    ("/db/7", 404, "there is no database 7"),
    ("/db/0/messages/no-such-id", 404, "no outbox row has the id"),
])
def test_bad_input_gets_a_page_that_says_what_is_wrong(
    client: httpx.Client, path: str, status: int, text: str,
) -> None:
    r = client.get(path)
    assert r.status_code == status and text in r.text, r.text


def test_an_action_without_rows_or_with_an_unknown_name_is_refused(
    engine: Engine, client: httpx.Client, seeded: Seeded,
) -> None:
    csrf = sign_in(client)
    none = client.post("/db/0/act", data={"csrf": csrf, "action": "replay"})
    assert none.status_code == 400 and "select at least one dead row" in none.text
    odd = client.post("/db/0/act", data={"csrf": csrf, "action": "delete",
                                         "id": seeded.dead_timeout[0]})
    assert odd.status_code == 400 and "unknown action" in odd.text
    assert set(statuses(engine, seeded.dead_timeout).values()) == {"dead"}


@pytest.mark.parametrize("back", ["//evil.example/x", "/\\evil.example", "https://evil.example"])
def test_signing_in_never_sends_the_browser_to_another_site(
    client: httpx.Client, back: str,
) -> None:
    r = client.post("/login", data={"token": TOKEN, "back": back}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
