#!/usr/bin/env python3
"""Cross-check of freshly packed RFC 0019 envelopes with ACA-Py 1.7.0's own Python code.

acapy_agent.wallet.crypto (PyNaCl; no code shared with mailroom, Credo or askar) packs and
unpacks DIDComm v1 envelopes. Run with the Python of the ACA-Py venv that
scripts/interop-setup.sh installs, by scripts/envelope-crosscheck.sh:

    crosscheck.py open FILE   open every envelope of FILE (written by today's Rust pack():
                              tests/envelope_crosscheck.rs) with each of its recipients' keys;
                              exit 1 if any does not open to its plaintext and sender
    crosscheck.py pack FILE   pack new envelopes (fresh keys, random plaintexts) for Rust to open

ACA-Py's payload decryption takes a 12-byte nonce only; for mailroom's XChaCha20 (24-byte
nonce) envelopes the content key is still unwrapped by ACA-Py's code and the payload is
decrypted with PyNaCl's xchacha20poly1305_ietf.
"""
import json
import os
import random
import string
import sys
import uuid

import nacl.bindings as nb
from acapy_agent.wallet import crypto
from acapy_agent.wallet.util import b58_to_bytes, bytes_to_b58

FORWARD = "https://didcomm.org/routing/1.0/forward"


def _b64u(s):
    import base64
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def keypair(seed_hex):
    return crypto.create_keypair(crypto.ED25519, bytes.fromhex(seed_hex))  # (verkey 32, secret 64)


def did_key_to_verkey(kid):
    """did:key:z6Mk... (multicodec ed25519-pub 0xed01) -> base58 verkey; others unchanged."""
    if not kid.startswith("did:key:z"):
        return kid
    raw = b58_to_bytes(kid[len("did:key:z"):].split("#")[0])
    if raw[:2] != b"\xed\x01":
        raise ValueError(f"not an Ed25519 did:key: {kid}")
    return bytes_to_b58(raw[2:])


def open_envelope(env: dict, secret: bytes):
    """(plaintext bytes, sender verkey or None, recipient verkey, how)."""
    my_vk = bytes_to_b58(crypto.sign_pk_from_sk(secret))

    def find_key(kid):
        return secret if did_key_to_verkey(kid) == my_vk else None

    raw = json.dumps(env).encode()
    iv = _b64u(env["iv"])
    if len(iv) == 12:
        text, sender_vk, recip_vk = crypto.decode_pack_message(raw, find_key)
        return text.encode("utf-8"), sender_vk, did_key_to_verkey(recip_vk), "acapy decode_pack_message"
    wrapper, recips, is_authcrypt = crypto.decode_pack_message_outer(raw)
    for kid, entry in recips.items():
        if find_key(kid):
            cek, sender_vk = crypto.extract_payload_key(entry, secret)
            break
    else:
        raise ValueError(f"no recipient for {my_vk} in {tuple(recips)}")
    if is_authcrypt and not sender_vk:
        raise ValueError("authcrypt without sender")
    pt = nb.crypto_aead_xchacha20poly1305_ietf_decrypt(
        wrapper.ciphertext + wrapper.tag, wrapper.protected_bytes, wrapper.iv, cek)
    return pt, sender_vk, did_key_to_verkey(kid), "acapy key unwrap + PyNaCl xchacha20poly1305_ietf"


def cmd_open(path):
    with open(path) as f:
        data = json.load(f)
    seeds = data["seeds_hex"]
    for name, vk in data["verkeys"].items():
        assert bytes_to_b58(keypair(seeds[name])[0]) == vk, f"{name}: seed gives another verkey"
    failures, hows = 0, set()
    vectors = data["vectors"]
    for v in vectors:
        try:
            for name in v["recipients"]:
                vk, sk = keypair(seeds[name])
                pt, sender_vk, recip_vk, how = open_envelope(v["envelope"], sk)
                assert recip_vk == bytes_to_b58(vk), (recip_vk, bytes_to_b58(vk))
                if v.get("forward_via"):
                    fwd = json.loads(pt)
                    assert fwd["@type"] == FORWARD, fwd.get("@type")
                    to_vk, to_sk = keypair(seeds[v["forward_to"]])
                    assert did_key_to_verkey(fwd["to"]) == bytes_to_b58(to_vk), fwd["to"]
                    assert sender_vk is None, "a forward is anoncrypt"
                    pt, sender_vk, _, how = open_envelope(fwd["msg"], to_sk)
                assert pt == v["plaintext"].encode("utf-8"), "plaintext differs"
                assert sender_vk == v["sender_verkey"], ("sender", sender_vk, v["sender_verkey"])
                hows.add(how)
            print(f"  ok   {v['name']} ({len(v['plaintext'].encode())} B, {len(v['recipients'])} recipient(s))")
        except Exception as e:  # noqa: BLE001 - report every vector, then fail
            failures += 1
            print(f"  FAIL {v['name']}: {e!r}")
    # Both payload ciphers must have been exercised, or the check proves less than it says.
    if len(hows) < 2 and not failures:
        print(f"  FAIL only {hows} exercised")
        failures += 1
    print(f"python opened {len(vectors) - failures}/{len(vectors)} envelopes packed by today's Rust pack()")
    return 1 if failures or not vectors else 0


def cmd_pack(path):
    names = ["sender", "recipient1", "recipient2", "recipient3"]
    seeds = {n: os.urandom(32).hex() for n in names}
    keys = {n: keypair(s) for n, s in seeds.items()}
    rng = random.SystemRandom()
    # ASCII only: ACA-Py 1.7's encrypt_plaintext splits the tag at len(str), not len(bytes).
    alphabet = string.ascii_letters + string.digits + " .,:;!?-_/\\\"{}[]"
    vectors = []
    cases = [("acapy_authcrypt_1", ["recipient1"], "sender"),
             ("acapy_anoncrypt_2", ["recipient1", "recipient2"], None),
             ("acapy_authcrypt_3", ["recipient1", "recipient2", "recipient3"], "sender"),
             ("acapy_anoncrypt_1", ["recipient1"], None)]
    for rnd in range(2):
        for name, to, sender in cases:
            size = rng.choice([rng.randint(1, 40), rng.randint(200, 1200), rng.randint(3000, 9000)])
            msg = json.dumps({"@type": "https://didcomm.org/basicmessage/1.0/message", "@id": str(uuid.uuid4()),
                              "content": "".join(rng.choice(alphabet) for _ in range(size))})
            env = crypto.encode_pack_message(msg, [keys[n][0] for n in to], keys[sender][1] if sender else None)
            vectors.append({"name": f"{name}_{rnd}", "recipients": to,
                            "sender_verkey": bytes_to_b58(keys[sender][0]) if sender else None,
                            "plaintext": msg, "envelope": json.loads(env)})
    out = {"generator": "scripts/didcomm-vectors/crosscheck.py pack (acapy_agent.wallet.crypto)",
           "seeds_hex": seeds, "verkeys": {n: bytes_to_b58(k[0]) for n, k in keys.items()}, "vectors": vectors}
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"python packed {len(vectors)} envelopes for Rust to open")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("open", "pack"):
        sys.exit(__doc__)
    sys.exit({"open": cmd_open, "pack": cmd_pack}[sys.argv[1]](sys.argv[2]))
