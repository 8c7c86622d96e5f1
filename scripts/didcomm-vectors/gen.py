#!/usr/bin/env python3
"""Interop vectors for src/didcomm/envelope.rs from an independent DIDComm v1 implementation.

aries-staticagent 0.8.0 (PyNaCl, no code shared with Credo, ACA-Py or askar) packs and
unpacks RFC 0019 envelopes. Run manually, not in CI; commit what it writes:

    python3.11 -m venv /tmp/dcvenv && /tmp/dcvenv/bin/pip install aries-staticagent==0.8.0
    /tmp/dcvenv/bin/python scripts/didcomm-vectors/gen.py gen
        -> tests/fixtures/didcomm/python_vectors.json   (Python packs, Rust unpacks)
    cargo test --lib didcomm -- --ignored write_rust_vectors
        -> tests/fixtures/didcomm/rust_vectors.json     (Rust packs)
    /tmp/dcvenv/bin/python scripts/didcomm-vectors/gen.py check
        -> tests/fixtures/didcomm/python_check.json     (what Python made of Rust's envelopes)

The seeds are throwaway test keys. What today's pack() writes is cross-checked on every run of
the test command by scripts/envelope-crosscheck.sh (fresh envelopes, ACA-Py's Python code).
"""
import hashlib
import json
import os
import sys
from collections import OrderedDict

import nacl.bindings as nb
import nacl.utils
from aries_staticagent import crypto

try:
    from importlib.metadata import version
except ImportError:  # pragma: no cover
    version = lambda _: "unknown"  # noqa: E731

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "didcomm")


def seed(name):
    return hashlib.sha256(("mailroom didcomm vector " + name).encode()).digest()


SEEDS = {n: seed(n) for n in ["sender", "recipient1", "recipient2", "recipient3", "mediator"]}


def keypair(name):
    return crypto.create_keypair(SEEDS[name])  # (verkey 32, sigkey 64)


def vk58(name):
    return crypto.bytes_to_b58(keypair(name)[0])


def b64u(b, pad):
    s = crypto.bytes_to_b64(b, urlsafe=True)
    return s if pad else s.rstrip("=")


def pack_xchacha(message, to, sender, pad):
    """RFC 0019 as indy-sdk specified it: XChaCha20-Poly1305 with a 24-byte nonce."""
    from_vk, from_sk = keypair(sender) if sender else (None, None)
    recips_json, cek = crypto.prepare_pack_recipient_keys(
        [keypair(n)[0] for n in to], from_vk, from_sk
    )
    recips = json.loads(recips_json, object_pairs_hook=OrderedDict)
    for r in recips["recipients"]:
        r["encrypted_key"] = b64u(crypto.b64_to_bytes(r["encrypted_key"], urlsafe=True), pad)
        h = r["header"]
        if h["sender"] is None:
            # what Credo writes for anoncrypt: no sender/iv at all
            del h["sender"], h["iv"]
        else:
            h["sender"] = b64u(crypto.b64_to_bytes(h["sender"], urlsafe=True), pad)
            h["iv"] = b64u(crypto.b64_to_bytes(h["iv"], urlsafe=True), pad)
    protected = b64u(json.dumps(recips, separators=(",", ":")).encode(), pad)
    nonce = nacl.utils.random(nb.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)
    out = nb.crypto_aead_xchacha20poly1305_ietf_encrypt(
        message.encode("utf-8"), protected.encode("ascii"), nonce, cek
    )
    ct, tag = out[:-16], out[-16:]
    return OrderedDict(
        [("protected", protected), ("iv", b64u(nonce, pad)),
         ("ciphertext", b64u(ct, pad)), ("tag", b64u(tag, pad))]
    )


def pack_staticagent(message, to, sender):
    from_vk, from_sk = keypair(sender) if sender else (None, None)
    return crypto.pack_message(message, [keypair(n)[0] for n in to], from_vk, from_sk)


def gen():
    msg = json.dumps({"@type": "https://didcomm.org/trust_ping/1.0/ping",
                      "@id": "4f5d1b5e-0000-4000-8000-000000000001",
                      "response_requested": True})
    utf8 = json.dumps({"@type": "https://didcomm.org/basicmessage/1.0/message",
                       "@id": "4f5d1b5e-0000-4000-8000-000000000002",
                       "content": "grüße, 你好 ✓"}, ensure_ascii=False)
    cases = [
        ("staticagent_authcrypt_1", msg, ["recipient1"], "sender",
         lambda: pack_staticagent(msg, ["recipient1"], "sender")),
        ("staticagent_authcrypt_3", msg, ["recipient1", "recipient2", "recipient3"], "sender",
         lambda: pack_staticagent(msg, ["recipient1", "recipient2", "recipient3"], "sender")),
        ("staticagent_anoncrypt_1", msg, ["recipient1"], None,
         lambda: pack_staticagent(msg, ["recipient1"], None)),
        ("staticagent_anoncrypt_2", msg, ["recipient1", "recipient2"], None,
         lambda: pack_staticagent(msg, ["recipient1", "recipient2"], None)),
        ("nacl_xchacha24_authcrypt_unpadded", utf8, ["recipient1", "recipient2"], "sender",
         lambda: pack_xchacha(utf8, ["recipient1", "recipient2"], "sender", pad=False)),
        ("nacl_xchacha24_anoncrypt_padded", utf8, ["recipient1"], None,
         lambda: pack_xchacha(utf8, ["recipient1"], None, pad=True)),
    ]
    vectors = []
    for name, plaintext, to, sender, make in cases:
        vectors.append(OrderedDict([
            ("name", name),
            ("recipients", to),
            ("sender_verkey", vk58(sender) if sender else None),
            ("plaintext", plaintext),
            ("envelope", make()),
        ]))
    out = OrderedDict([
        ("generator", "scripts/didcomm-vectors/gen.py gen, aries-staticagent %s, PyNaCl %s"
         % (version("aries-staticagent"), version("PyNaCl"))),
        ("seeds_hex", {k: v.hex() for k, v in SEEDS.items()}),
        ("verkeys", {k: vk58(k) for k in SEEDS}),
        ("vectors", vectors),
    ])
    path = os.path.join(FIXTURES, "python_vectors.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print("wrote", path)


def unpack_any(env, name):
    """Unpack with aries-staticagent when the payload nonce is 12 bytes (all it supports),
    else with PyNaCl XChaCha using staticagent's key unwrapping."""
    vk, sk = keypair(name)
    iv = crypto.b64_to_bytes(env["iv"], urlsafe=True)
    if len(iv) == 12:
        text, sender_vk, recip_vk = crypto.unpack_message(json.dumps(env).encode(), vk, sk)
        return text.encode("utf-8"), sender_vk, recip_vk, "aries-staticagent unpack_message"
    protected = json.loads(crypto.b64_to_bytes(env["protected"], urlsafe=True))
    cek, sender_vk, recip_vk = crypto.locate_pack_recipient_key(protected["recipients"], vk, sk)
    ct = crypto.b64_to_bytes(env["ciphertext"], urlsafe=True)
    tag = crypto.b64_to_bytes(env["tag"], urlsafe=True)
    pt = nb.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ct + tag, env["protected"].encode("ascii"), iv, cek)
    return pt, sender_vk, recip_vk, "staticagent key unwrap + PyNaCl xchacha20poly1305_ietf"


def check():
    with open(os.path.join(FIXTURES, "rust_vectors.json")) as f:
        rust = json.load(f)
    assert rust["seeds_hex"] == {k: v.hex() for k, v in SEEDS.items()}, "seed mismatch"
    results = []
    for v in rust["vectors"]:
        env = v["envelope"]
        env_sha = hashlib.sha256(
            json.dumps(env, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        res = OrderedDict([("name", v["name"]), ("envelope_sha256", env_sha)])
        try:
            opened = []
            for name in v["recipients"]:
                pt, sender_vk, recip_vk, how = unpack_any(env, name)
                if v.get("forward_via"):
                    # Outer layer: anoncrypt forward for the mediator; open the inner one too.
                    fwd = json.loads(pt)
                    assert fwd["@type"] == "https://didcomm.org/routing/1.0/forward", fwd
                    assert fwd["to"] == vk58(v["forward_to"]), fwd["to"]
                    assert sender_vk is None
                    pt, sender_vk, recip_vk, how = unpack_any(fwd["msg"], v["forward_to"])
                assert pt == v["plaintext"].encode("utf-8"), "plaintext differs"
                assert sender_vk == v["sender_verkey"], (sender_vk, v["sender_verkey"])
                opened.append(recip_vk)
            res["ok"] = True
            res["opened_by"] = opened
            res["how"] = how
            res["plaintext_sha256"] = hashlib.sha256(v["plaintext"].encode()).hexdigest()
        except Exception as e:  # report, don't stop
            res["ok"] = False
            res["error"] = repr(e)
        results.append(res)
        print(res["name"], "ok" if res["ok"] else res["error"])
    out = OrderedDict([
        ("checker", "scripts/didcomm-vectors/gen.py check, aries-staticagent %s, PyNaCl %s"
         % (version("aries-staticagent"), version("PyNaCl"))),
        ("results", results),
    ])
    path = os.path.join(FIXTURES, "python_check.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print("wrote", path)
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    {"gen": gen, "check": check}[sys.argv[1] if len(sys.argv) > 1 else "gen"]()
