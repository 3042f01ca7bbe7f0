import contextlib
from decimal import Decimal

from sqlalchemy import Column, MetaData, Numeric, String, Table
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from outbox import AsyncOutbox, create_async_engine
from outbox.aio import AsyncSqlTransport

orders = Table("orders", MetaData(), Column("order_no", String(40), primary_key=True),
               Column("total", Numeric(12, 2), nullable=False))
engine = create_async_engine("sqlite:///shop.db")   # or postgresql+psycopg://, mysql+asyncmy://
outbox = AsyncOutbox(engine)
transport = AsyncSqlTransport(create_async_engine("sqlite:///broker.db"))


@outbox.transactional_message(topic="orders", message_id="order_no")
async def place_order(session, order_no: str, total: Decimal) -> None:
    await session.execute(orders.insert().values(order_no=order_no, total=total))


async def post_order(request):
    body = await request.json()
    await place_order(body["order_no"], Decimal(body["total"]))
    return JSONResponse({"status": "placed"}, status_code=201)


@contextlib.asynccontextmanager
async def lifespan(_app):
    relay = outbox.relay(transport.publisher()).start()  # publishes in this event loop
    yield
    await relay.stop()  # lets the batch in hand finish
    await engine.dispose()
    await transport.engine.dispose()

app = Starlette(routes=[Route("/orders", post_order, methods=["POST"])], lifespan=lifespan)
