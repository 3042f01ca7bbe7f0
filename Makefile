# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   - the bank-transfer demo on SQLite and the embedded SQL transport
#   make test   - install and start PostgreSQL, MariaDB, Redis, RocketMQ 5 and 4.9, then
#                 the whole suite
PYTHON ?= python3
RMQ_ENDPOINTS ?= 127.0.0.1:8081
RMQ_NAMESRV ?= 127.0.0.1:9876
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-postgres demo-mariadb demo-rocketmq demo-rocketmq4 demo-kafka demo-nats demo-rabbitmq demo-redis chaos bench model-check test lint services services-down clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# More: make demo DEMO_ARGS=--keep-running (the services stay up until Ctrl-C)
DEMO_ARGS ?=
demo: $(STAMP)
	PYTHONPATH=examples $(PY) -m bank_transfer.demo $(DEMO_ARGS)

# The same demo with both banks on the test servers started by scripts/services.
demo-postgres: $(STAMP) services
	eval "$$(scripts/services env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --bank1-db "$${OUTBOX_TEST_POSTGRES_URL%/*}/bank1" --bank2-db "$${OUTBOX_TEST_POSTGRES_URL%/*}/bank2"

demo-mariadb: $(STAMP) services
	eval "$$(scripts/services env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --bank1-db "$${OUTBOX_TEST_MARIADB_URL%/*}/bank1" --bank2-db "$${OUTBOX_TEST_MARIADB_URL%/*}/bank2"

# The same demo over a real RocketMQ 5 broker (Java and Maven needed; the first
# start fetches its jars): bank1 sends transactional half messages.
demo-rocketmq: $(STAMP)
	scripts/rocketmq up
	PYTHONPATH=examples $(PY) -m bank_transfer.demo --transport rocketmq

# The same over a RocketMQ 4.9 broker, reached over the remoting protocol.
demo-rocketmq4: $(STAMP)
	scripts/rocketmq4 up
	eval "$$(scripts/rocketmq4 env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --transport rocketmq --rocketmq-namesrv "$$OUTBOX_TEST_ROCKETMQ4_NAMESRV"

# The same demo over the other brokers (--transport broker --broker URL): every
# transfer's message is an outbox row that the relay publishes to the broker.
demo-kafka: $(STAMP)
	scripts/kafka up
	eval "$$(scripts/kafka env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --transport broker --broker "$$OUTBOX_TEST_KAFKA_URL"

demo-nats: $(STAMP)
	scripts/nats up
	eval "$$(scripts/nats env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --transport broker --broker "$$OUTBOX_TEST_NATS_URL"

demo-rabbitmq: $(STAMP)
	scripts/rabbitmq up
	eval "$$(scripts/rabbitmq env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --transport broker --broker "$$OUTBOX_TEST_RABBITMQ_URL"

demo-redis: $(STAMP)
	scripts/services up redis
	eval "$$(scripts/services env)"; PYTHONPATH=examples $(PY) -m bank_transfer.demo \
	  --transport broker --broker "$$OUTBOX_TEST_REDIS_URL"

# The services under faults (kills, outages, hostile messages) on every database and
# adapter (SQL transport, RocketMQ 5 through the proxy, RocketMQ 4.9 over remoting, the
# brokers reached by URL); ends with a CHAOS line, non-zero when anything was lost or
# duplicated.
# More: make chaos CHAOS_ARGS="--matrix full --transfers 200 --seed 42"
CHAOS_ARGS ?=
chaos: $(STAMP) services
	$(SERVICE_ENV) PYTHONPATH=examples $(PY) -m bank_transfer.chaos $(CHAOS_ARGS)

# The project's benchmark: one table, bench.json, and a last line starting BENCH.
# Every figure is a ratio against a baseline measured in the same run. QUICK=1 is the
# smoke run (under 2 minutes); more: make bench BENCH_ARGS="--db mariadb --only write"
QUICK ?=
BENCH_ARGS ?=
bench: $(STAMP) services
	eval "$$(scripts/services env)"; OUTBOX_TEST_ROCKETMQ_ENDPOINTS=$(RMQ_ENDPOINTS) \
	  PYTHONPATH=scripts $(PY) -m bench $(if $(QUICK),--quick) $(BENCH_ARGS)

# The databases and Redis first (one apt run installs every Debian package), then
# the brokers side by side (each JVM takes a while to come up).
BROKERS := rocketmq4 rocketmq kafka nats rabbitmq
services:
	scripts/services up
	pids=""; for b in $(BROKERS); do scripts/$$b up & pids="$$pids $$!:$$b"; done; rc=0; \
	  for p in $$pids; do wait $${p%%:*} || { echo "scripts/$${p#*:} up failed" >&2; rc=1; }; done; \
	  exit $$rc

services-down:
	for b in $(BROKERS); do scripts/$$b down; done
	scripts/services down

# The shell lines that point the tests at every service.
SERVICE_ENV := eval "$$(scripts/services env)"; eval "$$(scripts/rocketmq4 env)"; \
	  eval "$$(scripts/kafka env)"; eval "$$(scripts/nats env)"; \
	  eval "$$(scripts/rabbitmq env)"; \
	  export OUTBOX_TEST_ROCKETMQ_ENDPOINTS=$(RMQ_ENDPOINTS) OUTBOX_TEST_ROCKETMQ_NAMESRV=$(RMQ_NAMESRV);

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples migrations
	$(VENV)/bin/mypy
	MYPYPATH=examples $(VENV)/bin/mypy --strict -p bank_transfer

# The commit protocol's Spin model (model/outbox.pml): every real configuration must
# verify and every mutation must be caught (a few minutes; installs spin if missing).
# make test runs it too, through tests/model.
model-check:
	scripts/model-check

# Two lanes side by side, the RocketMQ tests and the rest (scripts/test-lanes; see
# tests/conftest.py), then the tests marked exclusive, alone.
test: $(STAMP) services lint
	scripts/model-check --install
	$(SERVICE_ENV) scripts/test-lanes $(PY)

clean:
	rm -rf .demo .chaos .model-check .pytest_cache .mypy_cache .ruff_cache
