#!/usr/bin/env python3
"""A real Indicio didcomm-messaging 0.1.1 wallet using a DIDComm v2 mediator.

    $INDICIO_PYTHON mediatee.py --invitation 'http://...?_oob=...' --mode live|poll
                                [--interval-ms 1000] [--exit-after N] [--timeout-s S] [--return-route]

Setup is Indicio's own client, `didcomm_messaging.quickstart`: generate_did + setup_default (a
did:peer:2 whose service uri is `didcomm:transport/queue`), then setup_relay: coordinate-mediation
3.0 mediate-request and, once granted, recipient-update adding a new did:peer:2 (same keys) whose
service uri is the grant's routing_did[0]. That relayed DID is what senders use.

Pickup 3.0:
- `poll`: quickstart.fetch_relayed_messages in a loop over HTTP (status-request, delivery-request
  with limit = message_count, messages-received), every --interval-ms.
- `live`: a WebSocket to the first ws(s):// uri among the mediator DID's DIDCommMessaging services
  (as quickstart.activate_websocket picks it), live-delivery-change {live_delivery: true} as the
  quickstart builds it (no return_route; --return-route adds return_route "all"), then every frame
  is unpacked: a `delivery` has its attachments opened and is acknowledged on the socket with
  messages-received; a `status` with message_count > 0 is answered with a delivery-request on the
  socket; any other message not from the mediator is taken as delivered as is. The quickstart's own
  socket handler cannot do this (it drops every message whose `from` is the mediator, deliveries
  included, and never acknowledges), so this loop is written here with the library's pack/unpack.
  On a closed socket it reconnects (0.5 s, doubling to 5 s) and asks for live delivery again.

JSON lines on stdout:
  {"event":"ready", "did":<relayed DID>, "requester_did":..., "mediator":..., "mode":...}
  {"event":"live", "endpoint":...}                 socket open and live-delivery-change sent
  {"event":"status", "message_count", "live_delivery"}
  {"event":"received", "id", "type", "from", "content", "authenticated", "attachment_id", "via"}
  {"event":"disconnected", "error"} / {"event":"error", "step", "error"} / {"event":"problem-report", "body"}
  {"event":"done", "received", "unique"}
Exit code 1 when mediation fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import websockets  # noqa: E402
from didcomm_messaging import quickstart as qs  # noqa: E402

from peer import parse_oob_url  # noqa: E402

T0 = time.monotonic()
PICKUP = "https://didcomm.org/messagepickup/3.0/"
seen: dict[str, int] = {}


def emit(**o):
    o["ms"] = int((time.monotonic() - T0) * 1000)
    print(json.dumps(o), flush=True)


def note_received(msg: dict, via: str, authenticated=None, attachment_id=None):
    mid = msg.get("id", "")
    seen[mid] = seen.get(mid, 0) + 1
    emit(event="received", id=mid, type=msg.get("type"), **{"from": msg.get("from")},
         content=(msg.get("body") or {}).get("content"), authenticated=authenticated,
         attachment_id=attachment_id, via=via)


def done():
    emit(event="done", received=sum(seen.values()), unique=len(seen))


async def poll_loop(dmp, did, mediator, interval: float, exit_after):
    async def callback(msg):
        note_received(msg, "poll")

    while True:
        try:
            await qs.fetch_relayed_messages(dmp, did, mediator, callback=callback)
        except Exception as e:  # noqa: BLE001 - a failed round is reported, the loop goes on
            emit(event="error", step="pickup", error=f"{type(e).__name__}: {e}")
        if exit_after is not None and len(seen) >= exit_after:
            return
        await asyncio.sleep(interval)


def _msg(type_: str, did: str, mediator: str, body: dict, return_route: bool) -> dict:
    m = {"type": PICKUP + type_, "id": str(uuid.uuid4()), "body": body, "from": did, "to": [mediator]}
    if return_route:
        m["return_route"] = "all"
    return m


async def live_loop(dmp, did, mediator, exit_after, return_route: bool):
    backoff = 0.5
    while True:
        change = _msg("live-delivery-change", did, mediator, {"live_delivery": True}, return_route)
        packed = await dmp.pack(message=change, to=mediator, frm=did)
        try:
            endpoint = packed.get_endpoint("ws")
        except IndexError:
            emit(event="error", step="live", error=f"the mediator DID has no ws(s):// DIDCommMessaging service: "
                                                  f"{[s.service_endpoint.uri for s in packed.target_services]}")
            return
        try:
            async with websockets.connect(endpoint) as ws:
                await ws.send(packed.message)  # bytes: a binary frame, as the quickstart sends it
                emit(event="live", endpoint=endpoint)
                backoff = 0.5
                async for frame in ws:
                    await on_frame(dmp, ws, frame, did, mediator, return_route)
                    if exit_after is not None and len(seen) >= exit_after:
                        return
            emit(event="disconnected", error="closed by the mediator")
        except (OSError, websockets.exceptions.WebSocketException) as e:
            emit(event="disconnected", error=f"{type(e).__name__}: {e}")
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def on_frame(dmp, ws, frame, did, mediator, return_route):
    try:
        unpacked = await dmp.unpack(frame)
    except Exception as e:  # noqa: BLE001
        emit(event="error", step="unpack frame", error=f"{type(e).__name__}: {e}")
        return
    msg = unpacked.message
    t = msg.get("type", "")
    if t == PICKUP + "delivery":
        ids = []
        for att in msg.get("attachments") or []:
            data = att.get("data") or {}
            try:
                if "json" in data:
                    raw = json.dumps(data["json"])
                else:
                    import base64
                    b = data["base64"]
                    raw = base64.urlsafe_b64decode(b + "=" * (-len(b) % 4)).decode()
                inner = await dmp.unpack(raw)
                note_received(inner.message, "live-delivery", inner.authenticated, att.get("id"))
            except Exception as e:  # noqa: BLE001
                emit(event="error", step="open attachment", error=f"{type(e).__name__}: {e}", attachment_id=att.get("id"))
            ids.append(att.get("id"))
        ack = _msg("messages-received", did, mediator, {"message_id_list": ids}, return_route)
        await ws.send((await dmp.pack(message=ack, to=mediator, frm=did)).message)
    elif t == PICKUP + "status":
        body = msg.get("body") or {}
        emit(event="status", message_count=body.get("message_count"), live_delivery=body.get("live_delivery"))
        if (body.get("message_count") or 0) > 0:
            req = _msg("delivery-request", did, mediator, {"limit": body["message_count"]}, return_route)
            await ws.send((await dmp.pack(message=req, to=mediator, frm=did)).message)
    elif t.endswith("/problem-report"):
        emit(event="problem-report", body=msg.get("body"), pthid=msg.get("pthid"))
    elif msg.get("from") != mediator:
        note_received(msg, "live-raw", unpacked.authenticated)
    else:
        emit(event="other", type=t)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--invitation", required=True)
    ap.add_argument("--mode", choices=("live", "poll"), default="live")
    ap.add_argument("--interval-ms", type=int, default=1000)
    ap.add_argument("--exit-after", type=int)
    ap.add_argument("--timeout-s", type=float, default=0)
    ap.add_argument("--return-route", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    try:
        inv = parse_oob_url(args.invitation)
        if inv.get("type") != "https://didcomm.org/out-of-band/2.0/invitation":
            raise ValueError(f"not an out-of-band 2.0 invitation: {inv.get('type')}")
        mediator = inv["from"]
        did, (verkey, xkey) = qs.generate_did()
        dmp = await qs.setup_default(did, (verkey, xkey))
        relayed = await qs.setup_relay(dmp, did, mediator, verkey, xkey)
        if not relayed:
            raise RuntimeError("mediation denied")
    except Exception as e:  # noqa: BLE001
        emit(event="error", step="mediation", error=f"{type(e).__name__}: {e}")
        return 1
    emit(event="ready", did=str(relayed), requester_did=str(did), mediator=mediator, mode=args.mode)

    if args.mode == "poll":
        work = poll_loop(dmp, did, mediator, args.interval_ms / 1000, args.exit_after)
    else:
        work = live_loop(dmp, did, mediator, args.exit_after, args.return_route)
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        if args.timeout_s > 0:
            await asyncio.wait_for(task, args.timeout_s)
        else:
            await task
    except (asyncio.CancelledError, asyncio.TimeoutError):
        pass
    done()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
