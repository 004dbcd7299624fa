//! TLS to the database (docs/store-engines.md): with `store.postgres_ca`
//! the PostgreSQL engine connects over rustls and verifies the server's
//! certificate against that CA. A cluster of its own that accepts TLS
//! connections only: the engine with the right CA works; with another CA,
//! or without TLS, it is refused. Needs the PostgreSQL `tests/run` provides.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use throughcare::certs::CertAuthority;
use throughcare::store::pg::PgOptions;
use throughcare::store::{Store, StoreOptions, SystemClock};

use crate::support;

const CLUSTER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pg-cluster");

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// Writes `text` into the cluster's directory as the server's user, private.
fn server_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    if is_root() {
        Command::new("chown")
            .args(["postgres:", path.to_str().unwrap()])
            .status()
            .unwrap();
    }
    Command::new("chmod")
        .args(["600", path.to_str().unwrap()])
        .status()
        .unwrap();
}

fn open(port: u16, ca: Option<&Path>, keys: &Path) -> Result<Store, String> {
    let pg = PgOptions {
        url: format!(
            "host=localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=5"
        ),
        ca_file: ca.map(Path::to_path_buf),
        pool_size: 2,
        require_synchronous_standby: false,
    };
    let options = StoreOptions {
        master_key_file: Some(keys.join("master-key")),
        audit_key_file: Some(keys.join("audit-key")),
        ..StoreOptions::default()
    };
    Store::open_postgres(&pg, options, Arc::new(SystemClock), keys).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_reached_over_verified_tls() {
    if support::postgres_database("store_tls").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    if is_root() {
        Command::new("chown")
            .args(["postgres:", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
    }
    let data = dir.path().join("pg");
    let port = support::free_port();
    let start = |args: &[&str]| {
        let out = Command::new(CLUSTER).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    start(&["start", data.to_str().unwrap(), &port.to_string()]);
    let _stop = Stop(data.clone());
    let ca = CertAuthority::generate("Throughcare test database CA").unwrap();
    let server = ca.issue_server(&["localhost"]).unwrap();
    server_file(&data.join("server.crt"), &server.cert_pem);
    server_file(&data.join("server.key"), &server.key_pem);
    // TLS only: a connection without it is turned away by the server.
    server_file(
        &data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
    );
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).unwrap();
    start(&["stop", data.to_str().unwrap()]);
    start(&["start", data.to_str().unwrap(), &port.to_string()]);

    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let ca_file = keys.join("db-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let store = open(port, Some(&ca_file), &keys).expect("TLS with the right CA connects");
    assert!(store.mailbox_stats().await.unwrap().is_empty());
    store.close().await.unwrap();

    let stranger = CertAuthority::generate("Some other CA").unwrap();
    let other_ca = keys.join("other-ca.pem");
    std::fs::write(&other_ca, stranger.cert_pem()).unwrap();
    let err = open(port, Some(&other_ca), &keys)
        .err()
        .expect("an unknown server is refused");
    assert!(err.contains("no connection to the database"), "{err}");
    let err = open(port, None, &keys)
        .err()
        .expect("without TLS the server refuses");
    assert!(err.contains("no connection to the database"), "{err}");
}

/// Stops the test's cluster, on failure too.
struct Stop(std::path::PathBuf);

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = Command::new(CLUSTER)
            .args(["stop", self.0.to_str().unwrap()])
            .output();
    }
}
