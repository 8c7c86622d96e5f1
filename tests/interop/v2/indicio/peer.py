"""A real Indicio `didcomm-messaging` 0.1.1 agent: keys, DIDs and a DIDCommMessaging instance.

Shared by capture.py (fixtures) and mediatee.py (the pickup 3.0 driver). Everything
cryptographic is the library's own: AskarCryptoService (or AuthlibCryptoService), its
PackagingService (pack/unpack, apv/apu/skid checks), RoutingService (forward wrapping), the
did:peer:2 / did:peer:4 resolvers. This module only wires them together and keeps the private
keys so a fixture can carry them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from aries_askar import Key, KeyAlg
from did_peer_2 import KeySpec, generate as peer2_generate
import did_peer_4

from didcomm_messaging import DIDCommMessaging
from didcomm_messaging.crypto.backend.askar import AskarCryptoService, AskarSecretKey
from didcomm_messaging.crypto.backend.basic import InMemorySecretsManager
from didcomm_messaging.multiformats import multibase, multicodec
from didcomm_messaging.packaging import PackagingService
from didcomm_messaging.resolver import PrefixResolver
from didcomm_messaging.resolver.peer import Peer2, Peer4
from didcomm_messaging.routing import RoutingService

CURVES = {"X25519": KeyAlg.X25519, "P-256": KeyAlg.P256, "P-384": KeyAlg.P384}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def from_b64u(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def multikey(key: Key) -> str:
    codec = {KeyAlg.ED25519: "ed25519-pub", KeyAlg.X25519: "x25519-pub"}[key.algorithm]
    return multibase.encode(multicodec.wrap(codec, key.get_public_bytes()), "base58btc")


def jwk_private(key: Key) -> dict:
    return json.loads(key.get_jwk_secret())


def jwk_public(key: Key) -> dict:
    return json.loads(key.get_jwk_public())


@dataclass
class Identity:
    """A DID with the askar keys behind it: kid -> Key."""

    did: str
    keys: dict[str, Key] = field(default_factory=dict)
    purposes: dict[str, str] = field(default_factory=dict)

    def fixture_keys(self, purpose: str | None = None, private: bool = True) -> list[dict]:
        out = []
        for kid, key in self.keys.items():
            if purpose and self.purposes[kid] != purpose:
                continue
            entry = {"kid": kid, "purpose": self.purposes[kid]}
            entry["private_jwk" if private else "public_jwk"] = jwk_private(key) if private else jwk_public(key)
            out.append(entry)
        return out


def new_peer2(services: list[dict] | None = None) -> Identity:
    """did:peer:2 as Indicio's quickstart makes it: V (Ed25519) then E (X25519), so #key-1 is the
    authentication key and #key-2 the key agreement key."""
    verkey = Key.generate(KeyAlg.ED25519)
    xkey = Key.generate(KeyAlg.X25519)
    did = peer2_generate(
        [KeySpec.verification(multikey(verkey)), KeySpec.key_agreement(multikey(xkey))],
        services or [],
    )
    ident = Identity(did)
    ident.keys[f"{did}#key-1"] = verkey
    ident.purposes[f"{did}#key-1"] = "authentication"
    ident.keys[f"{did}#key-2"] = xkey
    ident.purposes[f"{did}#key-2"] = "keyAgreement"
    return ident


def new_peer4(curve: str = "X25519", services: list[dict] | None = None) -> tuple[Identity, str]:
    """A long-form did:peer:4 (and its short form) from an input document with an Ed25519
    authentication key and a key agreement key on `curve`. X25519 keys are Multikey, NIST
    keys JsonWebKey2020 (Indicio's AskarKey reads NIST keys only from a JWK). Secrets are
    registered under the long-form and the short-form kids."""
    verkey = Key.generate(KeyAlg.ED25519)
    xkey = Key.generate(CURVES[curve])
    if curve == "X25519":
        agreement_vm = {"id": "#key-2", "type": "Multikey", "publicKeyMultibase": multikey(xkey)}
    else:
        agreement_vm = {"id": "#key-2", "type": "JsonWebKey2020", "publicKeyJwk": jwk_public(xkey)}
    input_doc = {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "verificationMethod": [
            {"id": "#key-1", "type": "Multikey", "publicKeyMultibase": multikey(verkey)},
            agreement_vm,
        ],
        "authentication": ["#key-1"],
        "keyAgreement": ["#key-2"],
    }
    if services:
        input_doc["service"] = services
    long = did_peer_4.encode(input_doc)
    short = did_peer_4.long_to_short(long)
    ident = Identity(long)
    for did in (long, short):
        ident.keys[f"{did}#key-1"] = verkey
        ident.purposes[f"{did}#key-1"] = "authentication"
        ident.keys[f"{did}#key-2"] = xkey
        ident.purposes[f"{did}#key-2"] = "keyAgreement"
    return ident, short


def resolver() -> PrefixResolver:
    return PrefixResolver({"did:peer:2": Peer2(), "did:peer:4": Peer4()})


async def messaging(identities: list[Identity], backend: str = "askar") -> DIDCommMessaging:
    """A DIDCommMessaging holding the secrets of `identities`, on the askar or authlib backend."""
    secrets = InMemorySecretsManager()
    if backend == "askar":
        crypto = AskarCryptoService()
        for ident in identities:
            for kid, key in ident.keys.items():
                await secrets.add_secret(AskarSecretKey(key, kid))
    elif backend == "authlib":
        from authlib.jose import JsonWebKey
        from didcomm_messaging.crypto.backend.authlib import AuthlibCryptoService, AuthlibSecretKey

        crypto = AuthlibCryptoService()
        for ident in identities:
            for kid, key in ident.keys.items():
                await secrets.add_secret(AuthlibSecretKey(JsonWebKey.import_key(jwk_private(key)), kid))
    else:
        raise ValueError(backend)
    return DIDCommMessaging(
        crypto=crypto, secrets=secrets, resolver=resolver(), packaging=PackagingService(), routing=RoutingService()
    )


def decode_protected(envelope: dict) -> dict | None:
    if "protected" in envelope:
        return json.loads(from_b64u(envelope["protected"]))
    return None


def parse_oob_url(url: str) -> dict[str, Any]:
    """The out-of-band 2.0 invitation carried in `_oob=` (or `oob=`)."""
    from urllib.parse import parse_qs, urlparse

    q = parse_qs(urlparse(url).query)
    for name in ("_oob", "oob"):
        if name in q:
            return json.loads(from_b64u(q[name][0]))
    raise ValueError(f"no _oob parameter in {url[:120]}")
