#!/usr/bin/env python3
"""A real Indicio didcomm-messaging 0.1.1 sender: DIDCommMessaging.pack (its RoutingService
wraps a routing 2.0 forward when the recipient's DIDCommMessaging service uri is a mediator DID)
and an HTTP POST to the endpoint the pack result names, the way its quickstart posts (aiohttp,
the packed bytes, no content-type of its own).

    $INDICIO_PYTHON sender.py --to <recipient DID> [--count 10] [--prefix msg] [--anoncrypt]

--anoncrypt leaves `from` out (ECDH-ES inner envelope): Veramo cannot open Indicio's authcrypt
(see ../README.md), so that is how an Indicio sender reaches a Veramo wallet.
Prints one JSON line per message {"event":"sent", "id", "content", "ok", "status", "error"?} and
{"event":"done", "sent", "failed"}; exit code 1 if any failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402

from peer import messaging, new_peer2  # noqa: E402

T0 = time.monotonic()


def emit(**o):
    o["ms"] = int((time.monotonic() - T0) * 1000)
    print(json.dumps(o), flush=True)


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--to", required=True)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--prefix", default="msg")
    ap.add_argument("--anoncrypt", action="store_true")
    args = ap.parse_args()

    me = new_peer2()
    dmp = await messaging([me])
    sent = failed = 0
    async with aiohttp.ClientSession() as session:
        for i in range(args.count):
            content = f"{args.prefix}-{i:04d}"
            msg = {"id": str(uuid.uuid4()), "type": "https://didcomm.org/basicmessage/2.0/message",
                   "typ": "application/didcomm-plain+json", "to": [args.to],
                   "created_time": int(time.time()), "body": {"content": content}}
            if not args.anoncrypt:
                msg["from"] = me.did
            try:
                packed = await dmp.pack(msg, args.to, None if args.anoncrypt else me.did)
                endpoint = packed.get_endpoint("http")
                async with session.post(endpoint, data=packed.message) as resp:
                    body = await resp.text()
                    if resp.status not in (200, 202):
                        raise RuntimeError(f"{endpoint} answered {resp.status}: {body[:200]}")
                sent += 1
                emit(event="sent", id=msg["id"], content=content, ok=True, status=resp.status)
            except Exception as e:  # noqa: BLE001 - reported per message
                failed += 1
                emit(event="sent", id=msg["id"], content=content, ok=False, error=f"{type(e).__name__}: {e}")
    emit(event="done", sent=sent, failed=failed, **{"from": me.did})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
