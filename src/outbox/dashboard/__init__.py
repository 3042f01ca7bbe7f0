"""A web dashboard over the outbox's tables (the ``dashboard`` extra:
``pip install 'outbox[dashboard]'``): ``outbox dashboard --db URL [--db URL ...]``.

One page per database (or tenant): messages by status and topic with filters and
keyset paging, a message's details (payload, headers, attempts, last error, the
consumers that processed it, what a RocketMQ check-back would answer), dead rows and
parked keys with replay, release and discard by selection or by filter (always
confirmed with the number of rows it touches), inbox and transaction-log lookups, and
the live counts and lag. Server-rendered HTML, no JavaScript, nothing fetched from
elsewhere.

Without a token it is read-only. With one (``--token`` or ``OUTBOX_DASHBOARD_TOKEN``)
an operator signs in and may act; writes are protected against cross-site requests
and logged. ``redact`` hides what the details page must not show::

    from outbox.dashboard import create_app
    app = create_app([engine], token=os.environ["OUTBOX_DASHBOARD_TOKEN"],
                     redact=lambda m: dataclasses.replace(m, payload=b'"(hidden)"'))
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "the outbox dashboard needs its extra: pip install 'outbox[dashboard]'"
    ) from exc

from .app import Dashboard, Settings, create_app
from .queries import Filter, Redactor

__all__ = ["Dashboard", "Filter", "Redactor", "Settings", "create_app"]
