#!/usr/bin/env python3
"""Topic-route probe for the RocketMQ 4.9.x name server started by scripts/rocketmq4.

Speaks the RocketMQ remoting protocol (standard library only) and asks the
name server for the route of each topic (GET_ROUTEINFO_BY_TOPIC). A topic is
"ready" when the route names a master broker address (brokerId 0) and at least
one writable queue. The probe retries until every topic is ready or --timeout
runs out, then prints one JSON line per topic (broker name, address, queues).

Exit status: 0 all topics ready, 1 not ready before the timeout, 2 bad usage.

Wire format (org.apache.rocketmq.remoting.protocol.RemotingCommand, 4.9.x):

    int32 BE   total length: everything after these 4 bytes
    int32 BE   high byte: serialization type (0 = JSON, 1 = ROCKETMQ binary),
               low 3 bytes: header length
    header     JSON {"code", "language", "version", "opaque", "flag",
               "remark", "extFields"}; flag bit 0 = response, bit 1 = one-way
    body       the rest; for this request the TopicRouteData as JSON

Codes (org.apache.rocketmq.common.protocol.RequestCode and ResponseCode, read
with javap from the 4.9.2 and 4.9.7 jars): GET_ROUTEINFO_BY_TOPIC = 105
(spelled GET_ROUTEINTO_BY_TOPIC in older sources; same number),
GET_BROKER_CLUSTER_INFO = 106; responses SUCCESS = 0, SYSTEM_ERROR = 1,
TOPIC_NOT_EXIST = 17. In 5.x the class moved to
org.apache.rocketmq.remoting.protocol.RequestCode, same numbers.

Name servers before 4.9.4 serialise the route with fastjson's defaults, which
leave integer map keys unquoted ({"brokerAddrs":{0:"127.0.0.1:20911"}}): not
JSON. 4.9.4 and later quote them when the request's version is >= V4_9_4 or
its header carries acceptStandardJsonOnly=true; the probe asks for both and
still repairs bare integer keys when an older server ignores the request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import socket
import struct
import sys
import time
from typing import Any

GET_ROUTEINFO_BY_TOPIC = 105
GET_BROKER_CLUSTER_INFO = 106
SUCCESS = 0
TOPIC_NOT_EXIST = 17

RESPONSE_FLAG = 1  # flag bit 0 (RemotingCommand.RPC_TYPE)
SERIALIZE_JSON = 0
MASTER_ID = "0"  # MixAll.MASTER_ID, a map key in brokerAddrs
PERM_WRITE = 2  # PermName.PERM_WRITE (PERM_READ = 4)


def version_ordinal(major: int, minor: int, patch: int) -> int:
    """Ordinal of MQVersion.Version.V<major>_<minor>_<patch> (the release, not SNAPSHOT).

    The enum runs V3_0_0_SNAPSHOT .. V3_9_9 (212 entries, irregular), then
    from V4_0_0_SNAPSHOT = 212 a regular SNAPSHOT/release pair for every
    x.y.z with y and z in 0..9.
    """
    return 212 + 2 * ((major - 4) * 100 + minor * 10 + patch) + 1


def version_name(ordinal: int) -> str:
    if ordinal < 212:
        return f"V3_x ordinal {ordinal}"
    n = ordinal - 212
    k = n // 2
    name = f"V{4 + k // 100}_{(k // 10) % 10}_{k % 10}"
    return name if n % 2 else name + "_SNAPSHOT"


# What this client claims to be: a 4.9.4 client gets standard JSON routes.
CLIENT_VERSION = version_ordinal(4, 9, 4)


class RemotingError(Exception):
    pass


class Connection:
    """One TCP connection to a remoting server; synchronous request/response."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.opaque = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def _recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(n)
            if not chunk:
                raise RemotingError("connection closed by the server")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def request(
        self, code: int, ext: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        opaque = next(self.opaque)
        header = {
            "code": code,
            "language": "PYTHON",
            "version": CLIENT_VERSION,
            "opaque": opaque,
            "flag": 0,
            "remark": None,
            "extFields": ext or {},
        }
        hdr = json.dumps(header, separators=(",", ":")).encode()
        if len(hdr) > 0xFFFFFF:
            raise RemotingError("header too long")
        frame = (
            struct.pack(">II", 4 + len(hdr) + len(body), (SERIALIZE_JSON << 24) | len(hdr))
            + hdr
            + body
        )
        self.sock.sendall(frame)
        while True:
            (total,) = struct.unpack(">I", self._recv_exact(4))
            payload = self._recv_exact(total)
            (mark,) = struct.unpack(">I", payload[:4])
            kind, hlen = mark >> 24, mark & 0xFFFFFF
            if kind != SERIALIZE_JSON:
                raise RemotingError(f"server answered with serialization type {kind}, not JSON")
            resp = json.loads(payload[4 : 4 + hlen])
            rbody = payload[4 + hlen :]
            # A server may also send us requests of its own; skip anything
            # that is not the response to this request.
            if resp.get("flag", 0) & RESPONSE_FLAG and resp.get("opaque") == opaque:
                return resp, rbody


_BARE_INT_KEY = re.compile(rb"([{,])\s*(-?\d+)\s*:")


def parse_fastjson(body: bytes) -> dict[str, Any]:
    try:
        parsed: dict[str, Any] = json.loads(body)
    except ValueError:
        # Pre-4.9.4 fastjson output: {0:"addr"} -> {"0":"addr"}.
        parsed = json.loads(_BARE_INT_KEY.sub(rb'\1"\2":', body))
    return parsed


def route_summary(topic: str, route: dict[str, Any]) -> dict[str, Any]:
    brokers = []
    for bd in route.get("brokerDatas") or []:
        addrs = {str(k): v for k, v in (bd.get("brokerAddrs") or {}).items()}
        brokers.append(
            {
                "brokerName": bd.get("brokerName"),
                "cluster": bd.get("cluster"),
                "master": addrs.get(MASTER_ID),
                "brokerAddrs": addrs,
            }
        )
    queues = [
        {
            "brokerName": qd.get("brokerName"),
            "readQueueNums": qd.get("readQueueNums"),
            "writeQueueNums": qd.get("writeQueueNums"),
            "perm": qd.get("perm"),
        }
        for qd in route.get("queueDatas") or []
    ]
    return {
        "topic": topic,
        "brokers": brokers,
        "queues": queues,
        "orderTopicConf": route.get("orderTopicConf"),
    }


def route_problem(summary: dict[str, Any], expect_broker: str | None) -> str | None:
    """Why a route is not usable yet, or None when it is."""
    masters = {b["brokerName"]: b["master"] for b in summary["brokers"] if b["master"]}
    if not masters:
        return "no master broker in the route"
    if expect_broker and expect_broker not in masters.values():
        return f"master address is {sorted(masters.values())}, expected {expect_broker}"
    writable = [
        q
        for q in summary["queues"]
        if q["brokerName"] in masters
        and (q["perm"] or 0) & PERM_WRITE
        and (q["writeQueueNums"] or 0) > 0
    ]
    if not writable:
        return "no writable queue on a master broker"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "topics", nargs="+", metavar="TOPIC", help="topics whose route must be readable"
    )
    ap.add_argument(
        "--namesrv", default="127.0.0.1:19876", help="name server host:port (127.0.0.1:19876)"
    )
    ap.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to keep retrying (30); 0 = one try"
    )
    ap.add_argument(
        "--expect-broker", metavar="HOST:PORT", help="the master address every route must name"
    )
    ap.add_argument(
        "--raw", action="store_true", help="print the whole TopicRouteData, not a summary"
    )
    ap.add_argument("--cluster", action="store_true", help="also print GET_BROKER_CLUSTER_INFO")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args()

    host, sep, port = args.namesrv.rpartition(":")
    if not sep or not port.isdigit():
        ap.error(f"--namesrv must be host:port, not {args.namesrv!r}")

    start = time.monotonic()
    deadline = start + args.timeout
    pending = list(dict.fromkeys(args.topics))
    results: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    server_version = None
    cluster = None
    attempt = 0

    while True:
        attempt += 1
        conn = None
        try:
            conn = Connection(host, int(port), timeout=3.0)
            for topic in list(pending):
                resp, body = conn.request(
                    GET_ROUTEINFO_BY_TOPIC, {"topic": topic, "acceptStandardJsonOnly": "true"}
                )
                server_version = resp.get("version", server_version)
                if resp.get("code") == SUCCESS:
                    route = parse_fastjson(body)
                    summary = route_summary(topic, route)
                    problem = route_problem(summary, args.expect_broker)
                    if problem is None:
                        results[topic] = route if args.raw else summary
                        pending.remove(topic)
                        problems.pop(topic, None)
                    else:
                        problems[topic] = problem
                elif resp.get("code") == TOPIC_NOT_EXIST:
                    problems[topic] = "TOPIC_NOT_EXIST (no broker has registered it yet)"
                else:
                    problems[topic] = f"code {resp.get('code')}: {resp.get('remark')}"
            if not pending and args.cluster:
                resp, body = conn.request(GET_BROKER_CLUSTER_INFO)
                cluster = parse_fastjson(body) if resp.get("code") == SUCCESS else resp
        except (OSError, RemotingError, ValueError) as exc:
            for topic in pending:
                problems[topic] = f"{type(exc).__name__}: {exc}"
        finally:
            if conn is not None:
                conn.close()

        if not pending:
            break
        if time.monotonic() >= deadline:
            break
        if not args.quiet and attempt % 10 == 1:
            first = pending[0]
            print(
                f"rocketmq4_probe: waiting for {len(pending)} topic(s), "
                f"e.g. {first}: {problems.get(first)}",
                file=sys.stderr,
            )
        time.sleep(0.5)

    for topic in args.topics:
        if topic in results:
            print(json.dumps(results[topic], sort_keys=not args.raw))
    if cluster is not None:
        print(json.dumps({"clusterInfo": cluster}))
    elapsed = time.monotonic() - start
    if pending:
        for topic in pending:
            print(f"rocketmq4_probe: {topic}: {problems.get(topic, 'not ready')}", file=sys.stderr)
        print(
            f"rocketmq4_probe: NOT READY after {elapsed:.1f} s ({attempt} attempts), "
            f"name server {args.namesrv}",
            file=sys.stderr,
        )
        return 1
    if not args.quiet:
        sv = (
            f"{version_name(server_version)} (ordinal {server_version})"
            if isinstance(server_version, int)
            else "?"
        )
        print(
            f"rocketmq4_probe: {len(results)} topic route(s) ready after {elapsed:.1f} s; "
            f"name server {args.namesrv} answers as {sv}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
