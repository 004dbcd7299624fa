//! Reaching the database: the connection string checked, TLS (rustls, the
//! servers verified against the configured CA), the pool, migrations, and
//! the listener that wakes long polls when another node changes a mailbox.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{CHANNEL, PgOptions, db_error};
use crate::store::{Signals, StoreError};

refinery::embed_migrations!("src/store/pg/migrations");

/// Serialises migrations across nodes starting at once (an arbitrary,
/// fixed advisory-lock key: "throughcare" in ASCII, truncated).
const MIGRATION_LOCK: i64 = 0x7468_726f_7567_6863;

/// A checked connection string and how to secure it.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
}

/// Why a connection string is refused: the reason, and whether it concerns
/// the CA setting rather than the string.
pub type TargetError = (bool, String);

/// Checks a connection string and TLS setting as configuration validation
/// needs: it parses, asks for a read-write session when it names several
/// hosts, and uses TLS (a CA is given) unless every host is on loopback.
///
/// # Errors
/// `(false, why)` for the string, `(true, why)` for the missing CA.
pub fn check_target(url: &str, has_ca: bool) -> Result<(), TargetError> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|e| (false, format!("does not parse as a connection string: {e}")))?;
    if config.get_hosts().is_empty() {
        return Err((false, "names no host (host=...)".into()));
    }
    if config.get_hosts().len() > 1
        && config.get_target_session_attrs() != TargetSessionAttrs::ReadWrite
    {
        return Err((
            false,
            "names several hosts but not target_session_attrs=read-write: a node could write to a standby"
                .into(),
        ));
    }
    if config.get_ssl_mode() == SslMode::Disable && has_ca {
        return Err((
            false,
            "sslmode=disable contradicts store.postgres_ca".into(),
        ));
    }
    if !has_ca && !all_loopback(&config) {
        return Err((
            true,
            "must name the CA of the database servers' certificates: TLS is required unless every host is on loopback"
                .into(),
        ));
    }
    Ok(())
}

fn all_loopback(config: &tokio_postgres::Config) -> bool {
    let host_ok = |h: &Host| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    };
    config.get_hosts().iter().all(host_ok)
        && config
            .get_hostaddrs()
            .iter()
            .all(std::net::IpAddr::is_loopback)
}

impl PgTarget {
    /// The connection to make for `pg`: `synchronous_commit = on` forced on
    /// every session, TLS required and verified when a CA is given.
    ///
    /// # Errors
    /// The string does not parse; the CA file does not read.
    pub fn parse(pg: &PgOptions) -> Result<Self, StoreError> {
        check_target(&pg.url, pg.ca_file.is_some())
            .map_err(|(_, why)| StoreError::Unavailable(format!("store.postgres_url {why}")))?;
        let mut config = tokio_postgres::Config::from_str(&pg.url)
            .map_err(|e| StoreError::Unavailable(format!("store.postgres_url: {e}")))?;
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=on"),
            None => "-c synchronous_commit=on".to_owned(),
        };
        config.options(options);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let tls = match &pg.ca_file {
            None => None,
            Some(path) => {
                config.ssl_mode(SslMode::Require);
                Some(MakeRustlsConnect::new(client_tls(path)?))
            }
        };
        Ok(Self { config, tls })
    }
}

/// rustls trusting exactly the CA(s) in `path`.
fn client_tls(path: &std::path::Path) -> Result<rustls::ClientConfig, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(StoreError::Unavailable(format!(
            "store.postgres_ca {} holds no usable CA certificate",
            path.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Unavailable(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The pool, after bringing the schema to this version (under an advisory
/// lock, so nodes starting together migrate once).
///
/// # Errors
/// The database cannot be reached or a migration fails.
pub async fn pool_and_migrate(target: PgTarget, size: usize) -> Result<Pool, StoreError> {
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &target.tls {
        Some(tls) => Manager::from_config(target.config.clone(), tls.clone(), manager_config),
        None => Manager::from_config(target.config.clone(), NoTls, manager_config),
    };
    let pool = Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(Duration::from_secs(10)))
        .create_timeout(Some(Duration::from_secs(10)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Unavailable(format!("postgres pool: {e}")))?;
    let mut object = pool
        .get()
        .await
        .map_err(|e| StoreError::Unavailable(format!("no connection to the database: {e}")))?;
    let client: &mut tokio_postgres::Client = &mut object;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db_error(&e))?;
    let migrated = migrations::runner().run_async(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| db_error(&e))?;
    migrated.map_err(|e| StoreError::Unavailable(format!("postgres migration failed: {e}")))?;
    Ok(pool)
}

/// Whether the primary makes commits wait for a synchronous standby
/// (`synchronous_standby_names` set): only then is an OK on two machines.
/// Without one, `required` refuses to open; otherwise it is logged loudly.
///
/// # Errors
/// No standby named while `required`; the database cannot be asked.
pub async fn check_synchronous_standby(pool: Pool, required: bool) -> Result<(), StoreError> {
    let object = pool
        .get()
        .await
        .map_err(|e| StoreError::Unavailable(format!("no connection to the database: {e}")))?;
    let row = object
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .map_err(|e| db_error(&e))?;
    let names: String = row.get(0);
    if !names.trim().is_empty() {
        tracing::info!(synchronous_standby_names = %names, "PostgreSQL commits wait for a synchronous standby");
        return Ok(());
    }
    if required {
        return Err(StoreError::Unavailable(
            "store.postgres_require_synchronous_standby: the PostgreSQL primary names no synchronous standby (synchronous_standby_names is empty), so an OK would be durable on one machine only; configure a synchronous standby, or set store.postgres_require_synchronous_standby = false to accept one machine's durability (docs/store-engines.md)".into(),
        ));
    }
    tracing::warn!(
        "the PostgreSQL primary names no synchronous standby: an OK is durable on one machine only (store.postgres_require_synchronous_standby = false)"
    );
    Ok(())
}

/// Listens for [`CHANNEL`] until the runtime stops, reconnecting after a
/// failure (a failover included). After each (re)connection every waiting
/// poll is woken, since notifications may have been missed meanwhile.
pub async fn listen(target: PgTarget, signals: Arc<Signals>) {
    // Doubling from 0.5 s to 5 s while the database is away (no log flood
    // during an outage); back to 0.5 s once a connection has lasted.
    const FIRST: Duration = Duration::from_millis(500);
    const MOST: Duration = Duration::from_secs(5);
    let mut backoff = FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let ended = match &target.tls {
            Some(tls) => listen_once(&target.config, tls.clone(), &signals).await,
            None => listen_once(&target.config, NoTls, &signals).await,
        };
        if started.elapsed() > Duration::from_secs(30) {
            backoff = FIRST;
        }
        if let Err(e) = ended {
            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis(), "postgres listener lost its connection; reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MOST);
    }
}

async fn listen_once<T>(
    config: &tokio_postgres::Config,
    tls: T,
    signals: &Signals,
) -> Result<(), StoreError>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    let (client, mut connection) = config.connect(tls).await.map_err(|e| db_error(&e))?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages =
            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx).map(|m| m));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(db_error(&e)),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .map_err(|e| db_error(&e))?;
    signals.wake_all();
    while let Some(mailbox) = rx.recv().await {
        signals.wake(&mailbox);
    }
    drop(client);
    driver
        .await
        .map_err(|e| StoreError::Unavailable(format!("postgres listener: {e}")))?
}
