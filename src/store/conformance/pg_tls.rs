//! The store link's TLS against the real server (`ssl = on`; its certificate read from the
//! server, `SHOW ssl_cert_file`, never assumed): what each `sslmode` connects to, and what the
//! server sees (`pg_stat_ssl` of every backend the store holds, told apart from the tests'
//! own connections by `application_name`).

use super::pg_backend::{admin, drop_test_db, server_url, test_db_name, PgBackend};
use super::*;

/// The server's certificate file. Debian's snakeoil certificate is self-signed: its own CA.
async fn server_cert_file() -> String {
    let a = admin().await;
    let file: String = a.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    if file.starts_with('/') {
        return file;
    }
    let dir: String = a.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
    format!("{dir}/{file}")
}

/// The backends connected to `db` as `app`, and whether every one of them runs over TLS.
async fn server_sees(db: &str, app: &str) -> (i64, Option<bool>) {
    let row = admin()
        .await
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
             WHERE a.datname = $1 AND a.application_name = $2",
            &[&db, &app],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A connection, a message queued, leased and acknowledged: every path of the store (pool,
/// writer task, lease task) has a connection open afterwards.
async fn round_trip(s: &Arc<dyn Store>) {
    let c = new_conn(s).await;
    assert_eq!(s.get_connection(&c).await.unwrap().unwrap().id, c);
    enqueue_ok(s, vec![msg(&c, "over tls", T0)]).await;
    let got = s.lease(&c, 10, "n1", T0, T0 + 60_000).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"over tls");
    assert_eq!(s.ack(&c, &ids(&got)).await.unwrap(), 1);
}

/// `server_url()` with its host replaced by `name`, still reaching the same address
/// (`hostaddr`): the host a `verify-full` link checks the certificate against.
async fn url_naming_host(name: &str, db: &str, params: &str) -> String {
    let base = server_url();
    let cfg: tokio_postgres::Config = base.parse().expect("MAILROOM_TEST_PG is a postgres:// URL");
    let Some(tokio_postgres::config::Host::Tcp(host)) = cfg.get_hosts().first() else {
        panic!("the TLS checks need a TCP host in {base}");
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap()
        .ip();
    let creds_end = base.rfind('@').map_or(base.find("://").unwrap() + 3, |i| i + 1);
    format!("{}{name}:{port}/{db}?hostaddr={addr}&{params}", &base[..creds_end])
}

/// The reason `open` refused `url` (it must refuse it).
async fn refusal(url: &str) -> String {
    match open_postgres(url, 2).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

/// Runs `check(db)` on its own task, then drops `db` (if it was created) even on failure.
async fn with_db<F, Fut>(db: String, check: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let r = tokio::spawn(check(db.clone())).await;
    drop_test_db(&db).await;
    rethrow(r);
}

/// `sslmode=require`: the suite's checks pass over TLS, and the server sees every backend of
/// the store encrypted, including the maintenance connection that created the database.
/// Before: tokio-postgres refused to connect at all ("no TLS implementation configured").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_encrypts_every_connection_of_the_store() {
    with_db(test_db_name(), |db| async move {
        let app = "mailroom-tls-require";
        // Not created beforehand: the store creates it, through the `postgres` database.
        let b: Arc<dyn Backend> = Arc::new(PgBackend {
            url: format!("{}/{db}?sslmode=require&application_name={app}", server_url()),
        });
        connection_crud_and_indexes(b.clone()).await;
        lease_ack_release(b.clone()).await;
        let s = b.open().await;
        round_trip(&s).await;
        let (n, all_tls) = server_sees(&db, app).await;
        assert!(n >= 1, "no backend of the store on {db}");
        assert_eq!(all_tls, Some(true), "{n} backends, not all over TLS");
    })
    .await
}

/// No `sslmode`: libpq's default, `prefer`, which takes the TLS the server offers (before it
/// was plaintext whatever the server offered). `disable` stays plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_sslmode_prefer_encrypts_and_disable_does_not() {
    with_db(test_db_name(), |db| async move {
        let default = open_postgres(
            &format!("{}/{db}?application_name=mailroom-tls-default", server_url()),
            2,
        )
        .await
        .unwrap();
        round_trip(&default).await;
        let (n, all_tls) = server_sees(&db, "mailroom-tls-default").await;
        assert!(
            n >= 1 && all_tls == Some(true),
            "prefer: {n} backends, TLS: {all_tls:?}"
        );

        let plain = open_postgres(
            &format!(
                "{}/{db}?sslmode=disable&application_name=mailroom-tls-disable",
                server_url()
            ),
            2,
        )
        .await
        .unwrap();
        round_trip(&plain).await;
        let (n, all_tls) = server_sees(&db, "mailroom-tls-disable").await;
        assert!(
            n >= 1 && all_tls == Some(false),
            "disable: {n} backends, TLS: {all_tls:?}"
        );
    })
    .await
}

/// `verify-ca` with the server's own (self-signed) certificate as `sslrootcert` connects;
/// `verify-full` too, to a host name the certificate carries. Before: tokio-postgres refused
/// both modes ("invalid value for parameter `sslmode`").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_and_verify_full_accept_the_servers_certificate() {
    let cert = server_cert_file().await;
    let pem = std::fs::read(&cert).unwrap();
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
    };
    let names = crate::store::postgres::dns_names_valid_for(&der);
    with_db(test_db_name(), |db| async move {
        let app = "mailroom-tls-verify-ca";
        let s = open_postgres(
            &format!(
                "{}/{db}?sslmode=verify-ca&sslrootcert={}&application_name={app}",
                server_url(),
                urlencoding::encode(&cert)
            ),
            2,
        )
        .await
        .unwrap();
        round_trip(&s).await;
        let (n, all_tls) = server_sees(&db, app).await;
        assert!(
            n >= 1 && all_tls == Some(true),
            "verify-ca: {n} backends, TLS: {all_tls:?}"
        );

        let name = names
            .first()
            .unwrap_or_else(|| panic!("the server's certificate {cert} names no DNS host"));
        let app = "mailroom-tls-verify-full";
        let url = url_naming_host(
            name,
            &db,
            &format!(
                "sslmode=verify-full&sslrootcert={}&application_name={app}",
                urlencoding::encode(&cert)
            ),
        )
        .await;
        let s = open_postgres(&url, 2).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        round_trip(&s).await;
        let (n, all_tls) = server_sees(&db, app).await;
        assert!(
            n >= 1 && all_tls == Some(true),
            "verify-full: {n} backends, TLS: {all_tls:?}"
        );
    })
    .await
}

/// What the verifying modes refuse, each with a reason that says why: a host the certificate
/// does not name (`verify-full` to the server's IP address), a certificate outside the webpki
/// roots (`verify-ca` without `sslrootcert`), and one outside `sslrootcert` (`require` with
/// one verifies the chain, as libpq does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_modes_refuse_what_the_certificate_does_not_prove() {
    let cert = urlencoding::encode(&server_cert_file().await).into_owned();
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    let ca = rcgen::generate_simple_self_signed(vec!["other.example".into()]).unwrap();
    std::fs::write(&other_ca, ca.cert.pem()).unwrap();
    let other_ca = urlencoding::encode(other_ca.to_str().unwrap()).into_owned();
    with_db(test_db_name(), |db| async move {
        let cfg: tokio_postgres::Config = server_url().parse().unwrap();
        let Some(tokio_postgres::config::Host::Tcp(host)) = cfg.get_hosts().first() else {
            panic!("the TLS checks need a TCP host");
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let ip = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap()
            .ip()
            .to_string();
        let err = refusal(&url_naming_host(&ip, &db, &format!("sslmode=verify-full&sslrootcert={cert}")).await).await;
        assert!(
            err.contains(&format!("certificate not valid for name \"{ip}\"")),
            "{err}"
        );
        let err = refusal(&format!("{}/{db}?sslmode=verify-ca", server_url())).await;
        assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
        let err = refusal(&format!("{}/{db}?sslmode=require&sslrootcert={other_ca}", server_url())).await;
        assert!(err.contains("invalid peer certificate: UnknownIssuer"), "{err}");
        // None of them got as far as creating the database.
        let exists = admin()
            .await
            .query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&db])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(exists, 0);
    })
    .await
}

/// A server whose TLS handshake fails (a certificate rustls cannot read, as X.509 v1 or a
/// 1024-bit RSA key: here a stand-in in front of the real server that answers the TLS request
/// with bytes that are no TLS record and passes a plaintext startup through). `prefer` goes on
/// in plaintext, as libpq does; `require` refuses. Before, `prefer` failed to connect at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_goes_on_in_plaintext_when_the_handshake_fails_and_require_does_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg: tokio_postgres::Config = server_url().parse().expect("a postgres:// URL");
    let Some(tokio_postgres::config::Host::Tcp(host)) = cfg.get_hosts().first().cloned() else {
        panic!("the stand-in needs a TCP host in {}", server_url());
    };
    let target = (host, cfg.get_ports().first().copied().unwrap_or(5432));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 8];
                if c.read_exact(&mut head).await.is_err() {
                    return;
                }
                // SSLRequest: length 8, code 80877103.
                if head == [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f] {
                    let _ = c.write_all(b"Snot a TLS record at all, not even close").await;
                    return;
                }
                let Ok(mut s) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                if s.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
    });
    let base = server_url();
    let creds_end = base.rfind('@').map_or(base.find("://").unwrap() + 3, |i| i + 1);
    let prefix = format!("{}127.0.0.1:{port}", &base[..creds_end]);
    let via = move |db: &str, params: &str| format!("{prefix}/{db}?{params}");
    with_db(test_db_name(), move |db| async move {
        let app = "mailroom-tls-fallback";
        let s = open_postgres(&via(&db, &format!("application_name={app}")), 2)
            .await
            .unwrap();
        round_trip(&s).await;
        let (n, all_tls) = server_sees(&db, app).await;
        assert!(n >= 1 && all_tls == Some(false), "{n} backends, TLS: {all_tls:?}");
        let e = refusal(&via(&db, "sslmode=require")).await;
        assert!(e.contains("TLS"), "{e}");
    })
    .await
}
