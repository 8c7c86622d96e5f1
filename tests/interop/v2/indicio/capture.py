#!/usr/bin/env python3
"""Captures real DIDComm v2 envelopes made by Indicio's didcomm-messaging 0.1.1 into
tests/fixtures/didcomm/v2/indicio/, for the Rust tests to unpack.

    $VENV/bin/python tests/interop/v2/indicio/capture.py [--out DIR] [--veramo-fixtures DIR]

(the venv is the one scripts/interop-setup.sh makes; it prints INDICIO_PYTHON=...).

Everything goes through the library's own API:
- the envelope matrix through its PackagingService (pack/unpack) on both crypto backends,
  askar (X25519, P-256, P-384) and authlib (X25519);
- the forward through DIDCommMessaging.pack (its RoutingService) for a recipient whose
  DIDCommMessaging service points at a mediator DID;
- the mediation client through `didcomm_messaging.quickstart` (setup_relay,
  fetch_relayed_messages, activate_websocket), Indicio's own client, run against an aiohttp
  listener on 127.0.0.1 that records every request and answers as a mediator would. Its
  answers are packed by the same library for the capture only: the mediator side is not what
  these fixtures are about (the `reply_*` fields say what was answered).
Each envelope is unpacked again by the library (peer_unpacked). At the end, the Veramo
fixtures (if present) are given to Indicio's unpack: which ones it accepts is an interop fact.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from aiohttp import WSMsgType, web  # noqa: E402

import peer  # noqa: E402
from peer import Identity, decode_protected, messaging, new_peer2, new_peer4, resolver  # noqa: E402

LIB = "didcomm-messaging 0.1.1"
written: list[str] = []


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def write(out: Path, name: str, fixture: dict):
    doc = {"peer": "indicio", "library": LIB, "case": name,
           "generated_by": "tests/interop/v2/indicio/capture.py", "generated_at": now(), **fixture}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    written.append(name)


def describe(envelope: str | bytes) -> dict:
    if isinstance(envelope, bytes):
        envelope = envelope.decode()
    j = json.loads(envelope)
    out = {"envelope": envelope, "envelope_json": j}
    p = decode_protected(j)
    if p is not None:
        out["protected"] = p
    return out


async def docs_for(*dids: str | None) -> dict:
    res = resolver()
    out = {}
    for d in dids:
        if d:
            base = d.split("#")[0]
            out[base] = await res.resolve(base)
    return out


def basic(frm: str | None, to: str, content: str) -> dict:
    msg = {"id": str(uuid.uuid4()), "type": "https://didcomm.org/basicmessage/2.0/message",
           "to": [to], "created_time": int(datetime.datetime.now().timestamp()), "body": {"content": content}}
    if frm:
        msg["from"] = frm
    return msg


async def pack_direct(dmp, msg: dict, to: str, frm: str | None) -> bytes:
    """PackagingService.pack: the envelope alone, with no routing (DIDCommMessaging.pack also
    resolves the recipient's services and fails on a DID that has none)."""
    return await dmp.packaging.pack(dmp.crypto, dmp.resolver, dmp.secrets, json.dumps(msg).encode(), [to], frm)


# ---------------------------------------------------------------------------- matrix
async def capture_matrix(out: Path) -> dict:
    summary = {"cases": [], "refused": {}, "cross_backend": {}}
    envelopes = {}
    for backend, curves in (("askar", ("X25519", "P-256", "P-384")), ("authlib", ("X25519", "P-256"))):
        for curve in curves:
            if curve == "X25519":
                recipient, sender = new_peer2(), new_peer2()
                short = None
            else:
                recipient, short = new_peer4(curve)
                sender, _ = new_peer4(curve)
            dmp = await messaging([recipient, sender], backend)
            for kind in ("anoncrypt", "authcrypt"):
                frm = sender.did if kind == "authcrypt" else None
                msg = basic(frm, recipient.did, f"{backend} {kind} {curve}")
                try:
                    env = await pack_direct(dmp, msg, recipient.did, frm)
                except Exception as e:  # noqa: BLE001 - a refusal is the finding
                    summary["refused"][f"{backend}/{kind}/{curve}"] = f"{type(e).__name__}: {e}"
                    continue
                d = describe(env)
                unpacked = await dmp.unpack(env)
                name = f"{kind}_{d['protected']['alg'].replace('+', '_')}_{d['protected']['enc']}_{curve}_{backend}"
                notes = []
                if curve != "X25519":
                    notes.append(f"{curve} keys live in a did:peer:4 (long form) as JsonWebKey2020: Indicio reads NIST keys "
                                 "only from JWK verification methods; its did:peer:2 Multikey table has no P-256/P-384 codec")
                if kind == "anoncrypt":
                    notes.append("Indicio anoncrypts with XC20P only (hard-coded), never A256CBC-HS512 or A256GCM")
                if backend == "askar":
                    notes.append("askar backend: per-recipient epk in recipients[].header (anoncrypt); general JSON "
                                 "serialization even for one recipient")
                    if kind == "authcrypt":
                        notes.append('askar backend puts typ "application/didcomm+encrypted" (not the spec\'s '
                                     "application/didcomm-encrypted+json) in authcrypt; the KDF is ECDH-1PU draft-04 "
                                     "(cc_tag = the content tag)")
                else:
                    notes.append("authlib backend (Authlib's JWE with its ECDH-1PU draft)")
                write(out, name, {
                    "kind": kind, "backend": backend, "alg": d["protected"]["alg"], "enc": d["protected"]["enc"],
                    "curve": curve, "standard": True, "plaintext": msg, **d,
                    "recipient_keys": recipient.fixture_keys("keyAgreement"),
                    **({"sender_keys": sender.fixture_keys(private=False)} if kind == "authcrypt" else {}),
                    "dids": await docs_for(recipient.did, frm),
                    **({"short_form_dids": {recipient.did: short}} if short else {}),
                    "peer_unpacked": {"message": unpacked.message, "authenticated": unpacked.authenticated,
                                      "recipient_kid": unpacked.recipient_kid, "sender_kid": unpacked.sender_kid},
                    "notes": notes,
                })
                summary["cases"].append(name)
                envelopes[(backend, kind, curve)] = (env, recipient, sender)
    # Each backend opens the other's X25519 envelopes?
    for kind in ("anoncrypt", "authcrypt"):
        for a, b in (("askar", "authlib"), ("authlib", "askar")):
            if (a, kind, "X25519") not in envelopes:
                continue
            env, recipient, sender = envelopes[(a, kind, "X25519")]
            dmp = await messaging([recipient, sender], b)
            try:
                await dmp.unpack(env)
                summary["cross_backend"][f"{a} -> {b} {kind}"] = "ok"
            except Exception as e:  # noqa: BLE001
                summary["cross_backend"][f"{a} -> {b} {kind}"] = f"{type(e).__name__}: {e}"
    return summary


# ---------------------------------------------------------------------------- forward
async def capture_forward(out: Path) -> dict:
    facts = {}
    mediator = new_peer2([{"type": "DIDCommMessaging",
                           "serviceEndpoint": {"uri": "http://127.0.0.1:9/", "accept": ["didcomm/v2"]}}])
    recipient = new_peer2([{"type": "DIDCommMessaging",
                            "serviceEndpoint": {"uri": mediator.did, "accept": ["didcomm/v2"]}}])
    sender = new_peer2()
    dmp = await messaging([mediator, recipient, sender])
    msg = basic(sender.did, recipient.did, "through the mediator")
    res = await dmp.pack(msg, recipient.did, sender.did)
    outer = await dmp.unpack(res.message)
    inner = json.dumps(outer.message["attachments"][0]["data"]["json"])
    inner_unpacked = await dmp.unpack(inner)
    write(out, "forward_service_uri_is_mediator_did", {
        "kind": "forward", **describe(res.message),
        "forward_plaintext": outer.message, "inner_envelope": inner, "inner_plaintext": msg,
        "target_services": [s.serialize() for s in res.target_services],
        "recipient_keys": mediator.fixture_keys("keyAgreement"),
        "final_recipient_keys": recipient.fixture_keys("keyAgreement"),
        "sender_keys": sender.fixture_keys(private=False),
        "dids": await docs_for(mediator.did, recipient.did, sender.did),
        "peer_unpacked": {"outer_authenticated": outer.authenticated, "inner_authenticated": inner_unpacked.authenticated},
        "notes": ["DIDCommMessaging.pack -> RoutingService.prepare_forward: the recipient's service uri is the mediator DID; "
                  "forward {typ: application/didcomm-plain+json, to: [<mediator DID>], body.next: <recipient DID>, "
                  "attachments[0]: {id, media_type: application/didcomm-encrypted+json, data.json}} anoncrypted "
                  "(ECDH-ES+A256KW/XC20P) to the mediator DID's first keyAgreement key; no expires_time"],
    })
    # routingKeys on the final recipient's own service: does Indicio wrap a forward?
    by_key = new_peer2([{"type": "DIDCommMessaging", "serviceEndpoint": {
        "uri": "http://127.0.0.1:9/", "accept": ["didcomm/v2"], "routingKeys": [f"{mediator.did}#key-2"]}}])
    dmp2 = await messaging([mediator, by_key, sender])
    res2 = await dmp2.pack(basic(sender.did, by_key.did, "routingKeys"), by_key.did, sender.did)
    p2 = decode_protected(json.loads(res2.message))
    facts["recipient routingKeys"] = (
        "ignored: the envelope is the bare authcrypt for the recipient, not a forward"
        if p2.get("alg", "").startswith("ECDH-1PU") else f"wrapped: {p2}")
    # A mediator DID whose service is in the legacy string shape (accept/routingKeys siblings).
    legacy_med = new_peer2([{"type": "DIDCommMessaging", "serviceEndpoint": "http://127.0.0.1:9/",
                             "accept": ["didcomm/v2"], "routingKeys": []}])
    legacy_rcpt = new_peer2([{"type": "DIDCommMessaging", "serviceEndpoint": {"uri": legacy_med.did, "accept": ["didcomm/v2"]}}])
    dmp3 = await messaging([legacy_med, legacy_rcpt, sender])
    try:
        await dmp3.pack(basic(sender.did, legacy_rcpt.did, "legacy"), legacy_rcpt.did, sender.did)
        facts["mediator service in legacy string shape"] = "ok"
    except Exception as e:  # noqa: BLE001
        facts["mediator service in legacy string shape"] = f"{type(e).__name__}: {e}"
    # A mediator service without `accept`.
    no_accept = new_peer2([{"type": "DIDCommMessaging", "serviceEndpoint": {"uri": "http://127.0.0.1:9/"}}])
    rc = new_peer2([{"type": "DIDCommMessaging", "serviceEndpoint": {"uri": no_accept.did, "accept": ["didcomm/v2"]}}])
    try:
        await (await messaging([no_accept, rc, sender])).pack(basic(sender.did, rc.did, "x"), rc.did, sender.did)
        facts["mediator service without accept"] = "ok"
    except Exception as e:  # noqa: BLE001
        facts["mediator service without accept"] = f"{type(e).__name__}: {e}"
    # A recipient with no service at all.
    bare = new_peer2()
    try:
        await (await messaging([bare, sender])).pack(basic(sender.did, bare.did, "x"), bare.did, sender.did)
        facts["DIDCommMessaging.pack to a DID with no service"] = "ok"
    except Exception as e:  # noqa: BLE001
        facts["DIDCommMessaging.pack to a DID with no service"] = f"{type(e).__name__}: {e}"
    return facts


# ---------------------------------------------------------------------------- mediation client
class CaptureMediator:
    """aiohttp listener: records what Indicio's quickstart client sends (HTTP and WebSocket) and
    answers each request the way a mediator would, so the client goes on to its next step."""

    def __init__(self):
        self.requests: list[dict] = []
        self.ws_frames: list[dict] = []
        self.mediator: Identity | None = None
        self.dmp = None
        self.pending: list[dict] = []  # attachments to deliver
        self.ws_done = asyncio.Event()

    async def start(self):
        app = web.Application()
        app.router.add_post("/", self.post)
        app.router.add_get("/ws", self.ws)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.http = f"http://127.0.0.1:{port}/"
        self.wsurl = f"ws://127.0.0.1:{port}/ws"
        # Two services, one per transport: quickstart picks `get_endpoint("ws")` / ("http") by uri prefix.
        self.mediator = new_peer2([
            {"type": "DIDCommMessaging", "serviceEndpoint": {"uri": self.http, "accept": ["didcomm/v2"]}},
            {"type": "DIDCommMessaging", "serviceEndpoint": {"uri": self.wsurl, "accept": ["didcomm/v2"]}},
        ])

    async def reply_for(self, msg: dict) -> dict | None:
        t = msg["type"]
        base = {"id": str(uuid.uuid4()), "thid": msg["id"], "from": self.mediator.did, "to": [msg["from"]]}
        if t.endswith("/mediate-request"):
            return {**base, "type": "https://didcomm.org/coordinate-mediation/3.0/mediate-grant",
                    "body": {"routing_did": [self.mediator.did]}}
        if t.endswith("/recipient-update"):
            ups = [{**u, "result": "success"} for u in msg["body"]["updates"]]
            return {**base, "type": "https://didcomm.org/coordinate-mediation/3.0/recipient-update-response",
                    "body": {"updates": ups}}
        if t.endswith("/status-request") or t.endswith("/messages-received"):
            if t.endswith("/messages-received"):
                ids = set(msg["body"].get("message_id_list", []))
                self.pending = [a for a in self.pending if a["id"] not in ids]
            return {**base, "type": "https://didcomm.org/messagepickup/3.0/status",
                    "body": {"message_count": len(self.pending), "live_delivery": False}}
        if t.endswith("/delivery-request"):
            return {**base, "type": "https://didcomm.org/messagepickup/3.0/delivery",
                    "body": {}, "attachments": self.pending[: msg["body"].get("limit", 10)]}
        if t.endswith("/live-delivery-change"):
            return {**base, "type": "https://didcomm.org/messagepickup/3.0/status",
                    "body": {"message_count": len(self.pending), "live_delivery": True}}
        return None

    async def post(self, request: web.Request):
        body = await request.read()
        unpacked = await self.dmp.unpack(body)
        reply = await self.reply_for(unpacked.message)
        rec = {"method": request.method, "path": request.path, "content_type": request.headers.get("content-type"),
               "body": body.decode(), "message": unpacked.message, "authenticated": unpacked.authenticated,
               "reply": reply}
        self.requests.append(rec)
        if reply is None:
            return web.Response(status=200)
        packed = await self.dmp.pack(reply, unpacked.message["from"], self.mediator.did)
        return web.Response(status=200, body=packed.message, content_type="application/didcomm-encrypted+json")

    async def ws(self, request: web.Request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for m in ws:
            if m.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            raw = m.data if isinstance(m.data, bytes) else m.data.encode()
            unpacked = await self.dmp.unpack(raw)
            reply = await self.reply_for(unpacked.message)
            self.ws_frames.append({"frame": "binary" if m.type == WSMsgType.BINARY else "text", "body": raw.decode(),
                                   "message": unpacked.message, "reply": reply})
            if reply:
                packed = await self.dmp.pack(reply, unpacked.message["from"], self.mediator.did)
                await ws.send_str(packed.message.decode())
            # Push one live delivery after the live-delivery-change, then see what comes back.
            if unpacked.message["type"].endswith("/live-delivery-change") and self.pending:
                delivery = {"id": str(uuid.uuid4()), "type": "https://didcomm.org/messagepickup/3.0/delivery",
                            "from": self.mediator.did, "to": [unpacked.message["from"]], "body": {},
                            "attachments": self.pending[:1]}
                packed = await self.dmp.pack(delivery, unpacked.message["from"], self.mediator.did)
                await ws.send_str(packed.message.decode())
                self.ws_frames.append({"pushed": delivery})
                self.ws_done.set()
        return ws

    async def stop(self):
        await self.runner.cleanup()


async def capture_client(out: Path) -> dict:
    from didcomm_messaging import quickstart as qs

    facts = {}
    cap = CaptureMediator()
    await cap.start()
    try:
        # The client as the quickstart makes it: generate_did + setup_default.
        did, (verkey, xkey) = qs.generate_did()
        dmp = await qs.setup_default(did, (verkey, xkey))
        client = Identity(did, {f"{did}#key-1": verkey, f"{did}#key-2": xkey},
                          {f"{did}#key-1": "authentication", f"{did}#key-2": "keyAgreement"})
        cap.dmp = await messaging([cap.mediator])
        relayed = await qs.setup_relay(dmp, did, cap.mediator.did, verkey, xkey)
        relayed_ident = Identity(relayed, {f"{relayed}#key-1": verkey, f"{relayed}#key-2": xkey},
                                 {f"{relayed}#key-1": "authentication", f"{relayed}#key-2": "keyAgreement"})
        cap.dmp = await messaging([cap.mediator, client, relayed_ident])  # so it can open forwarded messages too
        # One queued message for the relayed DID, packed by a sender through the mediator.
        sender = new_peer2()
        sdmp = await messaging([sender])
        queued_msg = basic(sender.did, relayed, "queued at the mediator")
        fwd = await sdmp.pack(queued_msg, relayed, sender.did)
        fwd_unpacked = await cap.dmp.unpack(fwd.message)
        att = fwd_unpacked.message["attachments"][0]
        cap.pending = [{"id": att["id"], "media_type": "application/didcomm-encrypted+json", "data": att["data"]}]
        got = []

        async def on_message(m):
            got.append(m)

        await qs.fetch_relayed_messages(dmp, did, cap.mediator.did, callback=on_message)
        facts["polled pickup delivered to callback"] = [m.get("body", {}).get("content") for m in got]
        # Live mode over WebSocket.
        fwd2 = await sdmp.pack(basic(sender.did, relayed, "live"), relayed, sender.did)
        att2 = (await cap.dmp.unpack(fwd2.message)).message["attachments"][0]
        cap.pending = [{"id": att2["id"], "media_type": "application/didcomm-encrypted+json", "data": att2["data"]}]
        got.clear()
        task = await qs.activate_websocket(dmp, did, cap.mediator.did, callback=on_message, create_task=True)
        try:
            await asyncio.wait_for(cap.ws_done.wait(), 10)
            await asyncio.sleep(1.0)  # let the client act on the pushed delivery
        finally:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        facts["live mode: what quickstart's websocket handler passed to the callback"] = [m.get("type") for m in got]
        facts["live mode: frames the client sent"] = [f["message"]["type"] for f in cap.ws_frames if "message" in f]

        dids = await docs_for(cap.mediator.did, did, relayed)
        for i, r in enumerate(cap.requests):
            t = r["message"]["type"].split("didcomm.org/")[1].replace("/", "_")
            write(out, f"client_{t}", {
                "kind": "client-message", "transport": "http",
                "http": {"method": r["method"], "path": r["path"], "content_type": r["content_type"]},
                "plaintext": r["message"], **describe(r["body"]),
                "recipient_keys": cap.mediator.fixture_keys("keyAgreement"),
                "sender_keys": client.fixture_keys(private=False),
                "dids": dids, "peer_unpacked": {"authenticated": r["authenticated"]},
                "reply_sent_by_capture": r["reply"],
                "notes": ["sent by didcomm_messaging.quickstart.send_http_message: aiohttp POST of the bytes with no "
                          "content-type of its own (aiohttp says application/octet-stream); it requires status 200 and "
                          "unpacks the response body if non-empty; return_route 'all' is added to every message",
                          "authcrypt from the quickstart DID (did:peer:2 V+E, service uri didcomm:transport/queue)"],
            })
        for f in cap.ws_frames:
            if "message" not in f:
                continue
            t = f["message"]["type"].split("didcomm.org/")[1].replace("/", "_")
            write(out, f"client_ws_{t}", {
                "kind": "client-message", "transport": "websocket", "ws_frame": f["frame"],
                "plaintext": f["message"], **describe(f["body"]),
                "recipient_keys": cap.mediator.fixture_keys("keyAgreement"),
                "sender_keys": client.fixture_keys(private=False), "dids": dids,
                "reply_sent_by_capture": f["reply"],
                "notes": ["quickstart.activate_websocket: connects to the mediator DID's first ws:// service uri and "
                          "sends this as its first frame (websockets library)"],
            })
        write(out, "did_peer2_quickstart", {"kind": "did", "did": did, "document": await resolver().resolve(did),
                                             "keys": client.fixture_keys(),
                                             "notes": ["quickstart.generate_did: V (Ed25519, #key-1) then E (X25519, #key-2); "
                                                       "service uri 'didcomm:transport/queue' (no endpoint: return route only)"]})
        write(out, "did_peer2_relayed", {"kind": "did", "did": relayed, "document": await resolver().resolve(relayed),
                                          "keys": relayed_ident.fixture_keys(),
                                          "notes": ["quickstart.setup_relay: the new DID it registers with recipient-update: "
                                                    "same keys, service {uri: routing_did[0], accept: [didcomm/v2]}"]})
        write(out, "did_peer2_mediator_two_services", {"kind": "did", "did": cap.mediator.did,
                                                        "document": await resolver().resolve(cap.mediator.did),
                                                        "keys": cap.mediator.fixture_keys(),
                                                        "notes": ["what this capture used as the mediator: two DIDCommMessaging services, "
                                                                  "http and ws, each {uri, accept}; did-peer-2 gives ids #service, #service-1"]})
    finally:
        await cap.stop()
    return facts


async def capture_dids(out: Path):
    svc = [{"id": "#didcomm", "type": "DIDCommMessaging", "serviceEndpoint": {"uri": "http://127.0.0.1:9/", "accept": ["didcomm/v2"]}}]
    p4, short = new_peer4("X25519", svc)
    res = resolver()
    write(out, "did_peer4_long", {"kind": "did", "did": p4.did, "short_form": short, "document": await res.resolve(p4.did),
                                  "keys": [k for k in p4.fixture_keys() if k["kid"].startswith(p4.did)],
                                  "notes": ["did-peer-4 0.1.4 resolve(long): id = long form, alsoKnownAs = [short form], "
                                            "relative ids as in the input document"]})
    import did_peer_4
    write(out, "did_peer4_short", {"kind": "did", "did": short, "long_form": p4.did,
                                   "document": did_peer_4.resolve_short(p4.did),
                                   "keys": [k for k in p4.fixture_keys() if k["kid"].startswith(short + "#")],
                                   "notes": ["did-peer-4 resolve_short(long): id = short form, alsoKnownAs = [long form]. "
                                             "Indicio's resolver cannot resolve a short form alone (no document)"]})
    try:
        await res.resolve(short)
        fact = "resolved"
    except Exception as e:  # noqa: BLE001
        fact = f"{type(e).__name__}: {e}"
    return {"resolve short-form did:peer:4 alone": fact}


async def veramo_cross(veramo_dir: Path) -> dict:
    """Indicio's unpack on Veramo's fixtures, with the recipient keys the fixtures carry."""
    from aries_askar import Key

    from didcomm_messaging.crypto.backend.askar import AskarSecretKey

    out = {}
    if not veramo_dir.is_dir():
        return {"skipped": f"{veramo_dir} not found"}
    for f in sorted(veramo_dir.glob("*.json")):
        fx = json.loads(f.read_text())
        if fx.get("kind") not in ("anoncrypt", "authcrypt", "forward", "client-message"):
            continue
        dmp = await messaging([])
        for k in fx.get("recipient_keys", []):
            if k.get("private_jwk"):
                await dmp.secrets.add_secret(AskarSecretKey(Key.from_jwk(json.dumps(k["private_jwk"])), k["kid"]))
        try:
            r = await dmp.unpack(fx["envelope"])
            out[f.stem] = "ok" + (" (authenticated)" if r.authenticated else "")
        except Exception as e:  # noqa: BLE001
            out[f.stem] = f"{type(e).__name__}: {e}"
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE.parent.parent.parent / "fixtures/didcomm/v2/indicio"))
    ap.add_argument("--veramo-fixtures", default=str(HERE.parent.parent.parent / "fixtures/didcomm/v2/veramo"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.json"):
        f.unlink()
    logging.basicConfig(level=logging.WARNING)
    summary = {"kind": "summary"}
    summary["matrix"] = await capture_matrix(out)
    summary["forward_facts"] = await capture_forward(out)
    summary["client_facts"] = await capture_client(out)
    summary["did_facts"] = await capture_dids(out)
    summary["indicio_unpacks_veramo_fixtures"] = await veramo_cross(Path(args.veramo_fixtures))
    summary["files"] = list(written)
    write(out, "_summary", summary)
    print(f"wrote {len(written)} fixtures to {out}")


if __name__ == "__main__":
    asyncio.run(main())
