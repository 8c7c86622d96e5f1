//! A node's signature on a read of a peer's admin API (the status page gathering the peers'
//! histories, `GET /history?scope=node`), keyed from the cluster secret.
//!
//! The node used to send its admin bearer token to every peer's configured admin address: to
//! whatever listens there (on a machine whose peers' admin listeners bind loopback, a local
//! process on this machine), in clear, and valid for every action on every node. A signature
//! proves only that a holder of the cluster secret asked, now, this one node for this one
//! read: it is worth nothing for another path or another node (whatever listens at a peer's
//! address cannot replay it to the others), and nothing once [`MAX_SKEW_MS`] has passed.
//!
//! Format of the `x-mailroom-peer` header: `<node> <unix ms> <hex HMAC-SHA256>`, the MAC over
//! `node \n target \n ms \n path` under the cluster's admin-read key
//! ([`ClusterKeys::admin_read`]: from the secret stretched with Argon2id and the cluster's
//! name, so a header seen by whatever listens at a peer's admin address lets it test guesses
//! of the secret only at Argon2's cost); `target` is the node read, which the reader checks is
//! itself.
//!
//! Must not: accept a signature for another path or another node, from a node not configured
//! here, from another cluster, or older (or further ahead) than [`MAX_SKEW_MS`]; compare MACs
//! in time that depends on where they differ.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::handshake::ClusterKeys;

type HmacSha256 = Hmac<Sha256>;

/// The request header carrying the signature.
pub const HEADER: &str = "x-mailroom-peer";
/// How far a signature's time may be from the reader's clock.
pub const MAX_SKEW_MS: u64 = 30_000;

fn mac(keys: &ClusterKeys, node: &str, target: &str, ms: u64, path: &str) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(keys.admin_read()).expect("HMAC takes any key length");
    m.update(node.as_bytes());
    m.update(b"\n");
    m.update(target.as_bytes());
    m.update(b"\n");
    m.update(ms.to_string().as_bytes());
    m.update(b"\n");
    m.update(path.as_bytes());
    m
}

/// The header value signing `node`'s read of `path` on `target` at `ms`.
pub fn sign(keys: &ClusterKeys, node: &str, target: &str, ms: u64, path: &str) -> String {
    let tag = mac(keys, node, target, ms, path).finalize().into_bytes();
    format!("{node} {ms} {}", hex::encode(tag))
}

/// The node whose valid signature `header` is for `path` on `me`, read at `now_ms`; `None` if
/// it is none (`configured` says which nodes may sign).
pub fn verify<'h>(
    header: &'h str,
    keys: &ClusterKeys,
    me: &str,
    path: &str,
    now_ms: u64,
    configured: impl Fn(&str) -> bool,
) -> Option<&'h str> {
    let mut parts = header.split(' ');
    let (node, ms, tag) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !configured(node) {
        return None;
    }
    let ms: u64 = ms.parse().ok()?;
    if ms.abs_diff(now_ms) > MAX_SKEW_MS {
        return None;
    }
    let tag = hex::decode(tag).ok()?;
    mac(keys, node, me, ms, path).verify_slice(&tag).ok()?;
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/history?scope=node";
    const NOW: u64 = 1_765_000_000_000;

    /// The reader's keys, derived once for the test.
    fn ours() -> &'static ClusterKeys {
        static KEYS: std::sync::OnceLock<ClusterKeys> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| ClusterKeys::derive(b"s3cret", "prod"))
    }

    fn ok(header: &str, path: &str, now: u64) -> bool {
        verify(header, ours(), "n1", path, now, |n| n == "n2").is_some()
    }

    fn sign(secret: &[u8], cluster: &str, node: &str, target: &str, ms: u64, path: &str) -> String {
        if (secret, cluster) == (&b"s3cret"[..], "prod") {
            return super::sign(ours(), node, target, ms, path);
        }
        super::sign(&ClusterKeys::derive(secret, cluster), node, target, ms, path)
    }

    #[test]
    fn a_signature_holds_for_its_node_path_cluster_and_time_only() {
        let h = sign(b"s3cret", "prod", "n2", "n1", NOW, PATH);
        assert!(ok(&h, PATH, NOW));
        assert!(ok(&h, PATH, NOW + MAX_SKEW_MS));
        assert!(!ok(&h, PATH, NOW + MAX_SKEW_MS + 1), "too old");
        assert!(!ok(&h, PATH, NOW - MAX_SKEW_MS - 1), "from the future");
        assert!(!ok(&h, "/connections", NOW), "another path");
        assert!(
            !ok(&sign(b"other", "prod", "n2", "n1", NOW, PATH), PATH, NOW),
            "another secret"
        );
        assert!(
            !ok(&sign(b"s3cret", "test", "n2", "n1", NOW, PATH), PATH, NOW),
            "another cluster"
        );
        assert!(
            !ok(&sign(b"s3cret", "prod", "n3", "n1", NOW, PATH), PATH, NOW),
            "a node not configured"
        );
        assert!(
            !ok(&sign(b"s3cret", "prod", "n2", "n4", NOW, PATH), PATH, NOW),
            "a read of another node, replayed here"
        );
        let forged = h.replace("n2 ", "n2 1").to_string();
        assert!(!ok(&forged, PATH, NOW));
        for junk in ["", "n2", "n2 1", "n2 x y", &format!("{h} extra")] {
            assert!(!ok(junk, PATH, NOW), "{junk:?}");
        }
    }
}
