"""The dashboard's web application (Starlette), server-rendered, no JavaScript.

Reads need nothing; writes (replay, discard, release) need the token: the operator
signs in with it once and gets a session cookie (HttpOnly, SameSite=Strict), and every
form carries a CSRF value bound to that session; a request from another origin is
refused. Every write is logged (``dashboard_action``: who, which database, what, how
many rows) through the ``outbox.dashboard`` logger.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import storage
from ..console import age
from ..db import hide_secrets, safe_url
from ..errors import ConfigurationError
from ..log import get_logger
from ..transaction import DEFAULT_LOCAL_TRANSACTION_TIMEOUT
from . import queries
from .queries import Filter, Redactor

log = get_logger("outbox.dashboard")

COOKIE = "outbox_dashboard_session"
MAX_FORM = 1 << 20  # a form larger than this is refused (ids of a large selection fit)
REFRESH_SECONDS = 5
ACTIONS = {"replay": "replay", "discard": "discard", "release": "discard"}


@dataclass(frozen=True)
class Database:
    name: str  #: the URL without its password
    engine: Engine


@dataclass
class Settings:
    databases: list[Database]
    token: str | None = None
    redact: Redactor | None = None
    local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT
    #: Key for the session cookie's signature; fresh per process unless given.
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @property
    def writable(self) -> bool:
        return bool(self.token)


def _when(value: dt.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S") + "Z"


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("outbox.dashboard", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["when"] = _when
    env.filters["age"] = age
    env.filters["short"] = lambda text, n=120: (text if len(text) <= n else text[:n] + "...")
    env.globals["urlencode"] = urlencode
    return env


class Forbidden(Exception):
    pass


class Dashboard:
    def __init__(self, settings: Settings) -> None:
        if not settings.databases:
            raise ConfigurationError("the dashboard needs at least one database (--db URL)")
        self.settings = settings
        self.env = _environment()

    # -- sessions and CSRF -------------------------------------------------------

    def _sign(self, text: str) -> str:
        return hmac.new(self.settings.secret, text.encode(), hashlib.sha256).hexdigest()

    def session(self, request: Request) -> str | None:
        """The signed-in session's nonce, or None."""
        if not self.settings.writable:
            return None
        raw = request.cookies.get(COOKIE, "")
        nonce, _, signature = raw.partition(".")
        if nonce and hmac.compare_digest(signature, self._sign("session:" + nonce)):
            return nonce
        return None

    def csrf(self, nonce: str | None) -> str:
        return self._sign("csrf:" + nonce) if nonce else ""

    def check_write(self, request: Request, form: Mapping[str, list[str]]) -> str:
        """The session of an allowed write, or :class:`Forbidden` with why."""
        if not self.settings.writable:
            raise Forbidden("this dashboard is read-only: start it with --token (or "
                            "OUTBOX_DASHBOARD_TOKEN) to replay or discard")
        self.check_origin(request)
        nonce = self.session(request)
        if nonce is None:
            raise Forbidden("sign in with the dashboard's token first")
        sent = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(sent, self.csrf(nonce)):
            raise Forbidden("the form's CSRF value does not match this session; reload "
                            "the page and try again")
        return nonce

    @staticmethod
    def check_origin(request: Request) -> None:
        origin = request.headers.get("origin") or request.headers.get("referer")
        if origin and origin != "null":
            host = urlsplit(origin).netloc
            if host != request.headers.get("host"):
                raise Forbidden(f"a request from another site ({host}) is refused")

    # -- rendering ---------------------------------------------------------------

    def page(self, request: Request, template: str, status: int = 200,
             **context: Any) -> HTMLResponse:
        nonce = self.session(request)
        html = self.env.get_template(template).render(
            request=request, databases=self.settings.databases,
            writable=self.settings.writable, signed_in=nonce is not None,
            csrf=self.csrf(nonce), **context)
        return HTMLResponse(html, status_code=status,
                            headers={"Cache-Control": "no-store",
                                     "X-Frame-Options": "DENY",
                                     "Content-Security-Policy":
                                         "default-src 'self'; frame-ancestors 'none'"})

    def problem(self, request: Request, status: int, text: str) -> HTMLResponse:
        return self.page(request, "problem.html", status=status, text=text)

    def database(self, request: Request) -> tuple[int, Database]:
        raw = request.path_params["db"]
        if not 0 <= raw < len(self.settings.databases):
            raise LookupError(f"there is no database {raw}; the dashboard has "
                              f"{len(self.settings.databases)} (0 to "
                              f"{len(self.settings.databases) - 1})")
        return raw, self.settings.databases[raw]

    # -- pages -------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        def read() -> list[tuple[Database, dict[str, int] | str]]:
            out: list[tuple[Database, dict[str, int] | str]] = []
            for db in self.settings.databases:
                try:
                    with db.engine.connect() as conn:
                        out.append((db, storage.counts(conn)))
                except SQLAlchemyError as exc:
                    out.append((db, self.db_error(db, exc)))
            return out
        return self.page(request, "index.html", rows=await run_in_threadpool(read))

    async def overview(self, request: Request) -> Response:
        n, db = self.database(request)
        refresh = request.query_params.get("refresh") != "0"
        data = await self.read(db, queries.overview)
        return self.page(request, "overview.html", n=n, db=db, o=data,
                         refresh=REFRESH_SECONDS if refresh else None)

    async def messages(self, request: Request) -> Response:
        n, db = self.database(request)
        q = request.query_params
        flt = Filter.parse(q)
        limit = queries.page_size(q.get("limit"))
        after = queries.after_seq(q.get("after"))

        def read(conn: Any) -> tuple[queries.Page, list[str], tuple[int, int]]:
            return (queries.list_messages(conn, flt, after=after, limit=limit),
                    queries.topics(conn), queries.count_dead(conn, flt))
        page, topics, (dead, _) = await self.read(db, read)
        return self.page(request, "messages.html", n=n, db=db, f=flt, page=page,
                         topics=topics, statuses=queries.STATUSES, limit=limit,
                         dead_matching=dead, first=after is None)

    async def message(self, request: Request) -> Response:
        n, db = self.database(request)
        message_id = request.path_params["message_id"]
        shown = await self.read(db, lambda conn: queries.message_details(
            conn, message_id, self.settings.redact, self.settings.local_transaction_timeout))
        if shown is None:
            return self.problem(request, 404, f"no outbox row has the id {message_id!r} "
                                              f"in {db.name}")
        return self.page(request, "message.html", n=n, db=db, m=shown)

    async def parked(self, request: Request) -> Response:
        n, db = self.database(request)
        keys = await self.read(db, lambda conn: storage.list_parked_keys(conn, queries.MAX_PAGE))
        return self.page(request, "parked.html", n=n, db=db, keys=keys)

    async def inbox(self, request: Request) -> Response:
        n, db = self.database(request)
        group = request.query_params.get("group", "").strip()
        message_id = request.query_params.get("message_id", "").strip()
        rows = None
        if group or message_id:
            rows = await self.read(db, lambda c: queries.inbox_lookup(c, group, message_id))
        return self.page(request, "inbox.html", n=n, db=db, group=group,
                         message_id=message_id, rows=rows)

    async def check(self, request: Request) -> Response:
        n, db = self.database(request)
        message_id = request.query_params.get("message_id", "").strip()
        answer = None
        if message_id:
            answer = await self.read(db, lambda c: queries.check_answer(
                c, message_id, self.settings.local_transaction_timeout))
        return self.page(request, "check.html", n=n, db=db, message_id=message_id,
                         answer=answer)

    async def dead_letters(self, request: Request) -> Response:
        n, db = self.database(request)
        group = request.query_params.get("group", "").strip()
        after = queries.after_seq(request.query_params.get("after"))
        rows, next_after = await self.read(
            db, lambda c: queries.consumer_dead_letter_page(c, group, after))
        return self.page(request, "dead_letters.html", n=n, db=db, group=group, rows=rows,
                         next_after=next_after)

    # -- writes ------------------------------------------------------------------

    async def act(self, request: Request) -> Response:
        """Replay, discard or release: first a confirmation with the number of rows
        it will touch, then (``confirmed``) the change."""
        n, db = self.database(request)
        form = await self.form(request)
        self.check_write(request, form)
        action = (form.get("action") or [""])[0]
        if action not in ACTIONS:
            raise ConfigurationError(f"unknown action {action!r}; give replay, discard "
                                     "or release")
        one = {k: v[0] for k, v in form.items() if v}
        by_filter = one.get("scope") == "filter"
        ids = list(dict.fromkeys(i for i in form.get("id", []) if i))
        flt = Filter.parse(one) if by_filter else Filter()
        if not by_filter and not ids:
            raise ConfigurationError("select at least one dead row, or act on the filter")
        client = request.client.host if request.client else "-"
        if one.get("confirmed") != "yes":
            if by_filter:
                count, upto = await self.read(db, lambda c: queries.count_dead(c, flt))
            else:
                count, upto = await self.read(db, lambda c: queries.count_dead_ids(c, ids)), 0
            return self.page(request, "confirm.html", n=n, db=db, action=action,
                             count=count, upto=upto, ids=ids, f=flt, by_filter=by_filter,
                             back=one.get("back", ""))
        change = ACTIONS[action]
        expected = 0
        if by_filter:
            upto = queries.after_seq(one.get("upto")) or 0
            expected = queries.after_seq(one.get("count")) or 0
            done = await run_in_threadpool(queries.apply_filter, db.engine, change, flt, upto)
            what = f"filter {flt.dead().params()} up to row {upto}"
        else:
            done = await run_in_threadpool(queries.apply, db.engine, change, ids)
            what = f"{len(ids)} selected ids"
        log.info("dashboard_action", action=action, db=db.name, rows=done, of=what,
                 client=client)
        return self.page(request, "done.html", n=n, db=db, action=action, done=done,
                         asked=len(ids) if not by_filter else expected,
                         back=one.get("back", ""))

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            return self.page(request, "login.html", failed=False)
        if not self.settings.writable:
            return self.problem(request, 403, "this dashboard is read-only: it was started "
                                              "without a token")
        self.check_origin(request)
        form = await self.form(request)
        given = (form.get("token") or [""])[0]
        client = request.client.host if request.client else "-"
        assert self.settings.token is not None
        if not hmac.compare_digest(given.encode(), self.settings.token.encode()):
            log.warning("dashboard_sign_in_refused", client=client)
            return self.page(request, "login.html", status=403, failed=True)
        nonce = secrets.token_hex(16)
        log.info("dashboard_signed_in", client=client)
        back = (form.get("back") or ["/"])[0]
        # Only a path of this site: "//host" and "/\\host" lead browsers elsewhere.
        local = back.startswith("/") and back[1:2] not in ("/", "\\")
        response = RedirectResponse(back if local else "/", status_code=303)
        response.set_cookie(COOKIE, f"{nonce}.{self._sign('session:' + nonce)}",
                            httponly=True, samesite="strict", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        self.check_origin(request)
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- plumbing ----------------------------------------------------------------

    @staticmethod
    async def form(request: Request) -> dict[str, list[str]]:
        body = await request.body()
        if len(body) > MAX_FORM:
            raise ConfigurationError(f"the form is larger than {MAX_FORM} bytes; select "
                                     "fewer rows, or act on a filter")
        return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)

    @staticmethod
    def db_error(db: Database, exc: SQLAlchemyError) -> str:
        orig = getattr(exc, "orig", None) or exc
        text = str(orig).splitlines()[0][:300] if str(orig) else type(exc).__name__
        return f"database error ({type(exc).__name__}) on {db.name}: " + hide_secrets(
            text, db.engine.url)

    async def read(self, db: Database, fn: Callable[[Any], Any]) -> Any:
        def run() -> Any:
            with db.engine.connect() as conn:
                return fn(conn)
        return await run_in_threadpool(run)

    def guarded(self, endpoint: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Forbidden as exc:
                log.warning("dashboard_write_refused", path=request.url.path,
                            reason=str(exc),
                            client=request.client.host if request.client else "-")
                return self.problem(request, 403, str(exc))
            except ConfigurationError as exc:
                return self.problem(request, 400, str(exc))
            except LookupError as exc:
                return self.problem(request, 404, str(exc))
            except SQLAlchemyError as exc:
                n = request.path_params.get("db", 0)
                db = self.settings.databases[n if 0 <= n < len(self.settings.databases) else 0]
                text = self.db_error(db, exc)
                log.warning("dashboard_database_error", error=text)
                return self.problem(request, 503, text)
        return handle

    def routes(self) -> list[Route | Mount]:
        g = self.guarded
        return [
            Route("/", g(self.index)),
            Route("/login", g(self.login), methods=["GET", "POST"]),
            Route("/logout", g(self.logout), methods=["POST"]),
            Route("/db/{db:int}", g(self.overview)),
            Route("/db/{db:int}/messages", g(self.messages)),
            Route("/db/{db:int}/messages/{message_id:path}", g(self.message)),
            Route("/db/{db:int}/parked", g(self.parked)),
            Route("/db/{db:int}/inbox", g(self.inbox)),
            Route("/db/{db:int}/check", g(self.check)),
            Route("/db/{db:int}/dead-letters", g(self.dead_letters)),
            Route("/db/{db:int}/act", g(self.act), methods=["POST"]),
            Mount("/static", StaticFiles(directory=Path(__file__).parent / "static"),
                  name="static"),
        ]


def create_app(engines: Sequence[Engine] | Mapping[str, Engine], *, token: str | None = None,
               redact: Redactor | None = None,
               local_transaction_timeout: dt.timedelta = DEFAULT_LOCAL_TRANSACTION_TIMEOUT,
               ) -> Starlette:
    """The dashboard as an ASGI application over ``engines`` (sync engines; one page per
    database, named by its URL without the password unless you pass a mapping).
    Without ``token`` it is read-only. ``redact`` gets each message before its details
    are shown and returns what to show."""
    if isinstance(engines, Mapping):
        databases = [Database(name, e) for name, e in engines.items()]
    else:
        databases = [Database(safe_url(e.url), e) for e in engines]
    dashboard = Dashboard(Settings(databases, token or None, redact, local_transaction_timeout))
    app = Starlette(routes=dashboard.routes())
    app.state.dashboard = dashboard
    return app
