//! The PostgreSQL engine: the queue contract of [`super`] in one database
//! that several gateway nodes share (docs/store-engines.md).
//!
//! # Invariants
//! - Every change and the audit entries that record it are one transaction;
//!   a caller is answered only after `COMMIT` returned. Every connection runs
//!   with `synchronous_commit = on`, so with `synchronous_standby_names` set
//!   on the primary a commit is on two machines before it returns.
//! - Locks are taken in one order, so no two transactions wait on each
//!   other in a cycle: the `counters` row (submits only) first, then
//!   delivery rows (several at once in ascending id, or `SKIP LOCKED`), then
//!   the `audit_head` row, last, just before the entries are appended. The
//!   audit trail is therefore one chain across nodes, and ids are gapless.
//! - Leasing selects with `FOR UPDATE SKIP LOCKED`: a delivery another node
//!   is leasing, acknowledging or sweeping is skipped, never leased twice.
//! - Long polls on any node are woken with `LISTEN`/`NOTIFY` on
//!   [`CHANNEL`] (the payload is a mailbox's ODS code, never patient data).
//! - Payloads are sealed as on sled ([`super::crypt`]): the database holds
//!   no clear payload and no unwrapped key.
//!
//! All database work runs on this engine's own small tokio runtime, so the
//! synchronous reads of the [`super::Store`] seam can wait for it from any
//! thread, inside a runtime or not.

mod connect;
mod identity;
mod import;
mod mesh;
mod pds;
mod queue;
mod reads;
mod retention;
mod sql;
mod submit;
mod turn;
pub mod witness;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Pool;

use super::{BarrierStats, Clock, Signals, StoreError, StoreOptions};
use crate::audit::AuditKey;

pub use connect::{PgTarget, check_target};
pub use import::ImportSummary;
pub use mesh::MESH_LOCK;
pub use pds::PDS_LOCK;
pub use retention::PASS_LOCK;
pub use turn::Turn;

/// The `LISTEN`/`NOTIFY` channel: a mailbox may have something new.
pub const CHANNEL: &str = "throughcare_mailbox";

/// The payload on [`CHANNEL`] that says an operator changed the registry
/// (never an ODS code: those have no `@`).
pub const REGISTRY_CHANGED: &str = "@registry";

/// How to reach the database and what keys to use.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// libpq-style connection string (several hosts allowed).
    pub url: String,
    /// CA certificate(s) (PEM) that sign the database servers' certificates:
    /// TLS is used (and verified) when given.
    pub ca_file: Option<PathBuf>,
    /// Most connections this node holds.
    pub pool_size: usize,
    /// Refuse to open unless the primary names a synchronous standby.
    pub require_synchronous_standby: bool,
}

/// The PostgreSQL engine; cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
}

/// What every operation needs.
pub(crate) struct Shared {
    runtime: Runtime,
    pool: Pool,
    cipher: Arc<super::crypt::PayloadCipher>,
    audit_key: Arc<AuditKey>,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    signals: Arc<Signals>,
    stats: Arc<BarrierStats>,
    closed: AtomicBool,
    /// This node's record of the chain's head ([`witness`]), when a
    /// witness directory is configured.
    witness: Option<std::path::PathBuf>,
    /// Whether this node records it (a gateway does; tools only check).
    recording: AtomicBool,
    /// The time this node's retention passes act on.
    retention_clock: std::sync::Mutex<super::clock::RetentionClock>,
}

/// The engine's runtime, shut down without blocking when the engine goes
/// (it may be dropped inside another runtime).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("held until drop").handle()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A database error as the store reports it (no query text, no values).
/// SQLSTATEs after which PostgreSQL has rolled the transaction back and
/// running it again is safe: a deadlock victim, a serialisation failure.
const RETRY_STATES: [&str; 2] = ["40P01", "40001"];

/// Whether `e` (from [`db_error`]) says the transaction was rolled back
/// for a reason that running it again may not meet.
pub(crate) fn is_rolled_back_to_retry(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(why)
        if RETRY_STATES.iter().any(|code| why.ends_with(&format!("(SQLSTATE {code})"))))
}

/// The server's message only: its detail may quote values.
pub(crate) fn db_error(e: &tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(match e.as_db_error() {
        Some(db) => format!("postgres: {} (SQLSTATE {})", db.message(), db.code().code()),
        None => format!("postgres: {e}"),
    })
}

impl PgStore {
    /// Connects, migrates the schema to this version and starts listening
    /// for other nodes' changes. The master key, audit key and patient-key
    /// files must be the same on every node.
    ///
    /// # Errors
    /// The database cannot be reached or migrated; a key file fails.
    pub fn open(
        pg: &PgOptions,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        dir: &std::path::Path,
    ) -> Result<PgStore, StoreError> {
        // Held so that an early return drops it without blocking: open may
        // run inside another runtime.
        let runtime = Runtime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("store-postgres")
                .enable_all()
                .build()?,
        ));
        let cipher = Arc::new(super::crypt::PayloadCipher::load_or_create(
            &options
                .master_key_file
                .clone()
                .unwrap_or_else(|| dir.join("master-key")),
        )?);
        let audit_key = Arc::new(load_audit_key(&options, dir)?);
        let signals = Arc::new(Signals::default());
        let target = connect::PgTarget::parse(pg)?;
        let pool = wait_on(
            runtime.handle(),
            connect::pool_and_migrate(target.clone(), pg.pool_size),
        )?;
        wait_on(
            runtime.handle(),
            connect::check_synchronous_standby(pool.clone(), pg.require_synchronous_standby),
        )?;
        let witness = witness::path(&options);
        if let Some(path) = witness.clone() {
            let (pool, key) = (pool.clone(), audit_key.clone());
            wait_on(runtime.handle(), async move {
                let client = pool
                    .get()
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("no connection: {e}")))?;
                witness::check(&**client, &key, &path).await
            })?;
        }
        runtime
            .handle()
            .spawn(connect::listen(target, signals.clone()));
        Ok(PgStore {
            shared: Arc::new(Shared {
                runtime,
                pool,
                cipher,
                audit_key,
                options,
                clock,
                signals,
                stats: Arc::new(BarrierStats::default()),
                closed: AtomicBool::new(false),
                witness,
                recording: AtomicBool::new(false),
                retention_clock: std::sync::Mutex::default(),
            }),
        })
    }

    /// Runs `work` on the engine's runtime and waits for it.
    async fn run<T, F>(&self, work: impl FnOnce(Arc<Shared>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        let task = work(self.shared.clone());
        self.shared
            .runtime
            .handle()
            .spawn(task)
            .await
            .map_err(|e| StoreError::Unavailable(format!("postgres task failed: {e}")))?
    }

    /// Runs `work` on the engine's runtime and blocks this thread until it
    /// is done (the seam's synchronous reads).
    fn block<T, F>(&self, work: impl FnOnce(Arc<Shared>) -> F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        wait_on(self.shared.runtime.handle(), work(self.shared.clone()))
    }

    /// The audit key (the chain's HMAC key and the signing key).
    pub fn audit_key(&self) -> &Arc<AuditKey> {
        &self.shared.audit_key
    }

    /// A notifier woken when `mailbox` may have new deliveries (on any node).
    pub fn mailbox_signal(&self, mailbox: &str) -> Arc<tokio::sync::Notify> {
        self.shared.signals.get(mailbox)
    }

    /// Counters for metrics: the PostgreSQL engine runs no barrier of its
    /// own (the database's commit is the barrier), so they stay at zero.
    pub fn stats(&self) -> &Arc<BarrierStats> {
        &self.shared.stats
    }

    /// The retention policy configured.
    pub fn retention_policy(&self) -> &super::RetentionPolicy {
        &self.shared.options.retention
    }

    /// Records the chain's head in this node's witness (when one is
    /// configured), and from now on at close too: a gateway node calls it
    /// every [`witness::EVERY`].
    ///
    /// # Errors
    /// Database failures; the witness cannot be written.
    pub async fn record_witness(&self) -> Result<(), StoreError> {
        let Some(path) = self.shared.witness.clone() else {
            return Ok(());
        };
        self.shared.recording.store(true, Ordering::Release);
        self.record_witness_to(path).await
    }

    /// Records the chain's head in the witness file `path` (`admin store
    /// accept-rollback` re-bases a node's witness with it).
    ///
    /// # Errors
    /// Database failures; the witness cannot be written.
    pub async fn record_witness_to(&self, path: std::path::PathBuf) -> Result<(), StoreError> {
        self.run(move |s| async move {
            let client = s.client().await?;
            witness::record(&**client, &s.audit_key, &path, s.now()).await
        })
        .await
    }

    /// Moves the handover and delivery counters to the next id range
    /// ([`super::integrity::next_id_range`]) above them and `witnessed` (the
    /// highest id this node's witness saw handed out) after a rollback
    /// `admin store accept-rollback` accepts: ids handed out after the
    /// backup was taken may be held by recipients and senders, and are not
    /// handed out again. Returns the first id of the new range.
    ///
    /// # Errors
    /// Database failures.
    pub async fn ids_beyond_the_lost(&self, witnessed: u64) -> Result<u64, StoreError> {
        self.run(move |s| async move {
            let mut client = s.client().await?;
            let tx = client.transaction().await.map_err(sql::db)?;
            let row = tx
                .query_one(
                    "SELECT last_handover, last_delivery FROM counters FOR UPDATE",
                    &[],
                )
                .await
                .map_err(sql::db)?;
            let highest = sql::un_id(row.get(0))
                .max(sql::un_id(row.get(1)))
                .max(witnessed);
            let from = super::integrity::next_id_range(highest);
            tx.execute(
                "UPDATE counters SET last_handover = $1, last_delivery = $1",
                &[&sql::id(from)],
            )
            .await
            .map_err(sql::db)?;
            tx.commit().await.map_err(sql::db)?;
            Ok(from)
        })
        .await
    }

    /// Stops taking calls and closes the pool, recording the witness first
    /// when this node records it (best effort: with the database away the
    /// last periodic record stands). Idempotent.
    ///
    /// # Errors
    /// None so far; kept for the seam.
    pub async fn close(&self) -> Result<(), StoreError> {
        if self.shared.recording.load(Ordering::Acquire)
            && !self.shared.closed.load(Ordering::Acquire)
            && let Err(e) = self.record_witness().await
        {
            tracing::warn!(error = %e, "the PostgreSQL witness was not recorded at close; the last record stands");
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.pool.close();
        Ok(())
    }
}

impl Shared {
    /// A pooled connection.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("no connection to the database: {e}")))
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The time a retention pass starting now acts on (see
    /// [`super::clock::RetentionClock`]).
    fn retention_time(&self) -> super::clock::RetentionTime {
        self.retention_clock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .time(&*self.clock)
    }
}

/// Runs `task` on `runtime` and blocks this thread until it is done. Unlike
/// `block_on`, this may be called from inside another runtime.
fn wait_on<T, F>(runtime: &tokio::runtime::Handle, task: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(task.await);
    });
    rx.recv()
        .map_err(|_| StoreError::Unavailable("postgres task failed".into()))?
}

/// The audit key: the configured file, else `<dir>.witness/audit-key` as on
/// sled; created when absent.
fn load_audit_key(options: &StoreOptions, dir: &std::path::Path) -> Result<AuditKey, StoreError> {
    let path = options.audit_key_file.clone().unwrap_or_else(|| {
        options
            .witness_dir
            .clone()
            .unwrap_or_else(|| super::high_water::default_dir(dir))
            .join("audit-key")
    });
    match AuditKey::load(&path)? {
        Some(key) => Ok(key),
        None => Ok(AuditKey::create(&path)?),
    }
}
