"""outbox.log: structlog's API over standard logging, one safe line per event."""

from __future__ import annotations

import logging
import unicodedata

import pytest
from sqlalchemy import make_url

import outbox.log
from outbox.log import get_logger

NAME = "outbox.test_log"
SECRET = "s3cr3t-pw"


def only_record(caplog: pytest.LogCaptureFixture) -> logging.LogRecord:
    records = [r for r in caplog.records if r.name == NAME]
    assert len(records) == 1, records
    return records[0]


def has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in text)


def test_wraps_the_standard_logger_of_that_name() -> None:
    log = get_logger("outbox.relay")
    assert log._logger is logging.getLogger("outbox.relay")


def test_renders_one_line_with_the_fields_also_as_extra(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    get_logger(NAME).bind(relay="r1").info(
        "relay_published", count=3, ok=True, none=None, error="Broker down: retry", empty="")
    record = only_record(caplog)
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        'relay_published relay=r1 count=3 ok=True none=None error="Broker down: retry" empty=""'
    )
    assert record.outbox == {  # type: ignore[attr-defined]
        "event": "relay_published", "relay": "r1", "count": 3, "ok": True, "none": None,
        "error": "Broker down: retry", "empty": "",
    }


def test_the_record_points_at_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    get_logger(NAME).warning("here")
    record = only_record(caplog)
    assert (record.funcName, record.filename) == (
        "test_the_record_points_at_the_caller", "test_log.py")


@pytest.mark.parametrize("char", [*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)),
                                  "\u2028", "\u2029", "\u202e"],
                         ids=lambda c: f"U+{ord(c):04X}")
def test_control_characters_are_escaped_everywhere(
    char: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    hostile = f"x{char}INFO forged"
    get_logger(NAME).error(hostile, **{"message_id": hostile, f"k{char}": 1},
                           error=ValueError(hostile), items=[hostile])
    record = only_record(caplog)
    line = record.getMessage()
    assert not has_control(line) and char not in line, repr(line)
    assert len(line.splitlines()) == 1
    assert all(char not in str(v) and char not in k
               for k, v in record.outbox.items())  # type: ignore[attr-defined]


def test_common_escapes_are_readable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    get_logger(NAME).info("evt", error="line1\r\nline2\tend\x1b[31m")
    assert only_record(caplog).getMessage() == r"evt error=line1\r\nline2\tend\x1b[31m"


def test_database_url_passwords_are_hidden(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    get_logger(NAME).info(
        "relay_started",
        db=make_url(f"postgresql+psycopg://u@h/db?password={SECRET}"),
        transport_db=f"mysql+pymysql://bank:{SECRET}@db/bank2?charset=utf8mb4",
        url=f"sqlite:///x.db?sslpassword={SECRET}",
        error=f"OperationalError: cannot connect to postgresql://u:{SECRET}@h/db",
    )
    record = only_record(caplog)
    assert SECRET not in record.getMessage()
    assert SECRET not in repr(record.outbox)  # type: ignore[attr-defined]
    assert "db=postgresql+psycopg://u@h/db?password=***" in record.getMessage()
    assert "transport_db=mysql+pymysql://bank:***@db/bank2?charset=utf8mb4" in record.getMessage()


def test_a_disabled_level_does_no_work(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=NAME)

    def must_not_render(*_args: object) -> tuple[str, dict[str, object]]:
        raise AssertionError("a disabled event was rendered")

    class Costly:
        def __str__(self) -> str:
            raise AssertionError("a disabled event's value was turned into text")

    monkeypatch.setattr(outbox.log, "render", must_not_render)
    get_logger(NAME).bind(context=Costly()).debug("outbox_message_committed", value=Costly())
    assert [r for r in caplog.records if r.name == NAME] == []


def test_each_level_is_respected(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=NAME)
    log = get_logger(NAME)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    log.log(logging.INFO, "i2")
    log.log(logging.ERROR, "e2")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == NAME] == [
        ("WARNING", "w"), ("ERROR", "e"), ("CRITICAL", "c"), ("ERROR", "e2")]


def test_exception_carries_the_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        get_logger(NAME).exception("relay_batch_failed", batch=1)
    record = only_record(caplog)
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert record.getMessage() == "relay_batch_failed batch=1"
    assert "exc_info" not in record.outbox  # type: ignore[attr-defined]


def test_bind_and_unbind_keep_the_same_standard_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=NAME)
    log = get_logger(NAME).bind(a=1, b=2).unbind("a")
    log.info("evt", c=3)
    assert only_record(caplog).getMessage() == "evt b=2 c=3"


def test_the_library_adds_no_handler_of_its_own() -> None:
    import outbox  # noqa: F401  (every module, with its loggers)

    assert logging.getLogger("outbox").handlers == []
    assert logging.getLogger("outbox").propagate
