//! Wiring: prepare everything (dev PKI, registry, TLS, store) before a port
//! is bound, then serve until shutdown and drain.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tonic::codec::CompressionEncoding;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::PatientKeyer;
use crate::config::{Config, ConfigError};
use crate::grpc::limits::{
    AroundForHealthLayer, DecodeRefusalLayer, RateLimitLayer, RefusalTally, shed_to_unavailable,
};
use crate::grpc::pb::handover_service_server::HandoverServiceServer;
use crate::grpc::pb::operator_service_server::OperatorServiceServer;
use crate::grpc::{Gateway, HandoverGrpc, OperatorGrpc};
use crate::journey::Registry;
use crate::operator::metrics::Metrics;
use crate::store::{Clock, Store, StoreError, StoreOptions, SystemClock};
use crate::tls::ReloadableConfig;

/// How often held treatment copies are checked against the registry.
const HELD_ROUTING_EVERY: Duration = Duration::from_secs(60);

/// Why the gateway could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Dev PKI could not be made.
    #[error("development certificates: {0}")]
    Certs(#[from] crate::certs::CertsError),
    /// TLS material unusable.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// Registry unusable.
    #[error(transparent)]
    Registry(#[from] crate::journey::RegistryError),
    /// Store failed to open or close.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Other I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The metrics listener could not be bound.
    #[error("config field `metrics.listen`: cannot listen on {addr}: {source}")]
    MetricsListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC listener could not be bound.
    #[error("config field `listen`: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The MLLP listener could not be bound.
    #[error("config field `mllp.listen`: cannot listen on {addr}: {source}")]
    MllpListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The descriptor set for gRPC reflection is unusable.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

impl AppError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            // A registry file that cannot be read or holds a mistake is a
            // configuration to fix, not a failure a restart can mend.
            AppError::Config(_) | AppError::Registry(_) => crate::config::EXIT_CONFIG,
            // A store that cannot be trusted (behind its witness, at odds
            // with it, or damaged) needs a person, not a restart.
            AppError::Store(
                StoreError::Behind { .. }
                | StoreError::Witness(_)
                | StoreError::AuditKey(_)
                | StoreError::Corrupt(_),
            ) => crate::config::EXIT_STORE_BEHIND,
            _ => 1,
        }
    }
}

/// A gateway ready to serve: everything loaded and checked, no port bound.
pub struct Prepared {
    config: Config,
    gateway: Arc<Gateway>,
    tls: ReloadableConfig,
    shutdown_tx: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    metrics_listener: Option<std::net::TcpListener>,
    mllp_listener: Option<std::net::TcpListener>,
    null_handover: bool,
    pds: Option<Arc<crate::pds::PdsClient>>,
    mesh: Option<Arc<crate::mesh::MeshClient>>,
}

fn load_or_create_secret(path: &Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() >= 32 => Ok(secret),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} holds fewer than 32 bytes", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = vec![0u8; 32];
            std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut secret)?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut opts = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.write(true).create_new(true).open(path)?;
            std::io::Write::write_all(&mut f, &secret)?;
            f.sync_all()?;
            Ok(secret)
        }
        Err(e) => Err(e),
    }
}

/// Tells systemd (a `Type=notify` unit, docs/throughcare.service) that the
/// gateway is ready or stopping. Without `NOTIFY_SOCKET` it does nothing.
fn notify_service_manager(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// Refused connections go to the audit trail.
struct AuditRefusals(Store);

impl crate::tls::RefusalSink for AuditRefusals {
    fn record(
        &self,
        refusal: crate::tls::Refusal,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let store = self.0.clone();
        Box::pin(async move {
            let event = crate::audit::AuditEvent {
                actor: refusal.actor,
                action: "connect",
                outcome: format!("refused: {}", refusal.reason),
                ..crate::audit::AuditEvent::default()
            };
            if let Err(e) = store.record(event).await {
                tracing::error!(error = %e, "a refused connection could not be audited");
            }
        })
    }
}

/// Warns, at every start, of what a deployment trusts that it may not mean
/// to: the development CA (its key beside it), any operator the CA issues,
/// no revocation list.
fn warn_of_trust(config: &Config, tls_files: &crate::tls::TlsFiles) {
    let dev_ca = std::fs::read(&tls_files.ca).is_ok_and(|pem| crate::certs::is_dev_ca(&pem));
    if dev_ca {
        // At every start, not only the first: a deployment configured
        // without TLS paths serves on the development PKI.
        tracing::warn!(
            ca = %tls_files.ca.display(),
            "the client CA is a DEVELOPMENT CA whose key sits beside it: anyone who can \
             read that key can pose as any organisation or operator; never use it in production"
        );
    } else {
        if config.tls.operators.is_none() {
            tracing::warn!(
                "tls.operators is unset: every urn:operator certificate the CA issues is an \
                 operator (break-glass reads included); list the operators this gateway accepts"
            );
        }
        if tls_files.crl.is_none() {
            tracing::warn!(
                "tls.crl is unset: no certificate is ever refused as revoked; configure the \
                 CA's CRL so that a lost or compromised certificate can be stopped"
            );
        }
    }
}

impl Prepared {
    /// Loads everything `config` names, creating the dev PKI when allowed and
    /// absent, and opens the store.
    ///
    /// # Errors
    /// Anything that would stop the gateway from serving correctly.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        config.validate()?;
        // The dev PKI first: a development MESH or PDS set-up may name its files.
        if config.dev_certs && crate::certs::ensure_dev_pki(&config.certs_dir)? {
            tracing::warn!(
                dir = %config.certs_dir.display(),
                "created DEVELOPMENT certificates and registry; never use them in production"
            );
        }
        let tls_files = config.tls_files();
        warn_of_trust(&config, &tls_files);
        let pds = crate::pds::client_from_config(&config.pds)?;
        let mesh = crate::mesh::client_from_config(&config.mesh, config.limits.max_document_bytes)?;
        let mut registry = Registry::load(&config.registry_path())?;
        let tls = ReloadableConfig::load(tls_files.clone())?;
        let secret_path = config
            .patient_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("patient-key"));
        let keyer = PatientKeyer::new(&load_or_create_secret(&secret_path)?);
        let metrics = Arc::new(Metrics::new(tls_files.cert, tls_files.ca).with_crl(tls_files.crl));
        let q = &config.queue;
        let options = StoreOptions {
            max_attempts: q.max_attempts,
            retry_backoff_ms: i64::try_from(q.retry_backoff_ms).unwrap_or(i64::MAX),
            observer: Some(metrics.barrier_observer()),
            cache_bytes: config.store.cache_bytes,
            pipeline_depth: config.store.pipeline_depth as usize,
            retention: config.retention.to_policy(),
            ..config.store_witness()
        };
        let store = match config.store.postgres() {
            Some(pg) => Store::open_postgres(&pg, options, clock.clone(), &config.data_dir)?,
            None => Store::open(&config.data_dir, options, clock.clone())?,
        };
        if store.engine() == crate::store::EngineKind::Sled
            && crate::store::high_water::same_volume(&config.data_dir, &config.witness_dir())
        {
            tracing::warn!(
                witness_dir = %config.witness_dir().display(),
                "the witness shares a volume with the data directory: a restore of that whole volume brings back both (set integrity.witness_dir to another volume)"
            );
        }
        // Operators' registry changes, kept in the store, win over the file.
        for raw in store.registry_records()? {
            let org: crate::journey::Organisation = serde_json::from_slice(&raw)
                .map_err(|e| StoreError::Corrupt(format!("registry record: {e}")))?;
            registry.put(org);
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        // Rebuilt from the audit trail once serving (`spawn_claims_restore`).
        let claims = crate::handover::ClaimGuard::deferred(
            config.limits.claim_limits(),
            Some(metrics.clone()),
        );
        let gateway = Arc::new(Gateway {
            store,
            registry: crate::journey::SharedRegistry::new(registry),
            deadlines: config.deadlines.to_deadlines(),
            clock,
            keyer,
            queue: config.queue.clone(),
            limits: crate::clinical::Limits {
                max_document_bytes: config.limits.max_document_bytes,
                ..crate::clinical::Limits::default()
            },
            shutting_down: shutdown_rx,
            claims,
            registry_changes: tokio::sync::Mutex::default(),
            operators: config
                .tls
                .operators
                .as_ref()
                .map(|names| names.iter().cloned().collect()),
        });
        Ok(Self {
            config,
            gateway,
            tls,
            shutdown_tx,
            metrics,
            metrics_listener: None,
            mllp_listener: None,
            null_handover: false,
            pds,
            mesh,
        })
    }

    /// Serves a Handover that stores nothing (`bench --baseline` measures
    /// the RPC stack with it). Never for a real deployment.
    #[must_use]
    pub fn with_null_handover(mut self) -> Self {
        self.null_handover = true;
        self
    }

    /// Loads with the system clock.
    ///
    /// # Errors
    /// As for [`Prepared::new`].
    pub fn with_system_clock(config: Config) -> Result<Self, AppError> {
        Self::new(config, Arc::new(SystemClock))
    }

    /// The store, for tests and tools.
    pub fn store(&self) -> &Store {
        &self.gateway.store
    }

    /// The use cases, for callers in process (handler-level tests, tools):
    /// the same layer every edge calls.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The metrics every service feeds (per-mailbox gauges are set through it).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Binds the metrics listener now (it is otherwise bound by
    /// [`Prepared::serve`]) and returns its address: tests use port 0.
    ///
    /// # Errors
    /// [`AppError::MetricsListen`].
    pub fn bind_metrics(&mut self) -> Result<SocketAddr, AppError> {
        let addr = self.config.metrics.listen;
        let failed = |source| AppError::MetricsListen { addr, source };
        if self.metrics_listener.is_none() {
            let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
            listener.set_nonblocking(true).map_err(failed)?;
            self.metrics_listener = Some(listener);
        }
        let listener = self.metrics_listener.as_ref().expect("bound above");
        listener.local_addr().map_err(failed)
    }

    /// Binds the MLLP listener now, when `[mllp]` is enabled (it is
    /// otherwise bound by [`Prepared::serve`]), and returns its address:
    /// tests use port 0.
    ///
    /// # Errors
    /// [`AppError::MllpListen`].
    pub fn bind_mllp(&mut self) -> Result<Option<SocketAddr>, AppError> {
        if !self.config.mllp.enabled {
            return Ok(None);
        }
        let addr = self.config.mllp.listen;
        let failed = |source| AppError::MllpListen { addr, source };
        if self.mllp_listener.is_none() {
            let listener = std::net::TcpListener::bind(addr).map_err(failed)?;
            listener.set_nonblocking(true).map_err(failed)?;
            self.mllp_listener = Some(listener);
        }
        let listener = self.mllp_listener.as_ref().expect("bound above");
        listener.local_addr().map(Some).map_err(failed)
    }

    /// Serves HL7 v2 over MLLP (when enabled) until shutdown; the task ends
    /// once every connection answered the message in hand.
    fn start_mllp(&mut self) -> Result<Option<tokio::task::JoinHandle<()>>, AppError> {
        let Some(addr) = self.bind_mllp()? else {
            return Ok(None);
        };
        let c = &self.config.mllp;
        let listener = self
            .mllp_listener
            .take()
            .map(TcpListener::from_std)
            .transpose()
            .map_err(|source| AppError::MllpListen { addr, source })?
            .expect("bound above");
        let transport = crate::mllp::Transport::Tls {
            config: self.tls.clone().without_h2(),
            limits: self.accept_limits(),
        };
        let settings = crate::mllp::Settings {
            max_message_bytes: usize::try_from(c.max_message_bytes).unwrap_or(usize::MAX),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            max_connections: c.max_connections as usize,
            max_connections_per_identity: c.max_connections_per_identity as usize,
        };
        tracing::info!(%addr, "serving HL7 v2 over MLLP (mutual TLS)");
        Ok(Some(crate::mllp::spawn(
            listener,
            transport,
            (
                self.gateway.clone(),
                self.metrics.clone(),
                Arc::new(AuditRefusals(self.gateway.store.clone())),
            ),
            settings,
            self.shutdown_tx.subscribe(),
        )))
    }

    /// Serves the metrics and the dashboard (plain HTTP) until told to stop.
    fn start_metrics(
        &mut self,
        trends: Arc<crate::operator::trends::Trends>,
        continuity: Arc<crate::operator::continuity::LatestContinuity>,
    ) -> Result<
        (
            tokio::task::JoinHandle<std::io::Result<()>>,
            tokio::sync::oneshot::Sender<()>,
        ),
        AppError,
    > {
        let metrics_addr = self.bind_metrics()?;
        let metrics_listener = self
            .metrics_listener
            .take()
            .map(TcpListener::from_std)
            .transpose()
            .map_err(|source| AppError::MetricsListen {
                addr: metrics_addr,
                source,
            })?
            .expect("bound above");
        if !metrics_addr.ip().is_loopback() {
            tracing::warn!(addr = %metrics_addr, "metrics are plain HTTP on a non-loopback address");
        }
        let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_server = tokio::spawn(crate::operator::metrics::serve(
            metrics_listener,
            self.metrics.clone(),
            crate::operator::dashboard::Dashboard::new(
                self.gateway.store.clone(),
                self.gateway.clock.clone(),
            )
            .with_trends(trends.clone())
            .with_continuity(continuity),
            async {
                let _ = metrics_stopped.await;
            },
        ));
        tracing::info!(addr = %metrics_addr, "serving Prometheus metrics and the dashboard: plain HTTP, GET /metrics and GET /");
        Ok((metrics_server, stop_metrics))
    }

    /// Stops taking calls, lets in-flight ones finish within `grace`.
    async fn drain<F>(
        &self,
        grace: Duration,
        health: tonic_health::server::HealthReporter,
        stop_server: tokio::sync::oneshot::Sender<()>,
        mut server: std::pin::Pin<&mut F>,
    ) -> Result<(), AppError>
    where
        F: Future<Output = Result<(), tonic::transport::Error>>,
    {
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: draining in-flight calls"
        );
        notify_service_manager(&[sd_notify::NotifyState::Stopping]);
        let _ = self.shutdown_tx.send(true);
        stop_serving(health).await;
        let _ = stop_server.send(());
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => {
                tracing::info!("drain finished");
                result.map_err(AppError::from)
            }
            Err(_) => {
                tracing::warn!("drain did not finish within the grace period; closing anyway");
                Ok(())
            }
        }
    }

    /// Closes the store after its final barrier, then the metrics listener.
    async fn close_store(
        &self,
        stop_metrics: tokio::sync::oneshot::Sender<()>,
        metrics_server: tokio::task::JoinHandle<std::io::Result<()>>,
    ) -> Result<(), AppError> {
        self.gateway.store.close().await?;
        let (barriers, fdatasyncs, commands, submits) = self.gateway.store.stats().snapshot();
        tracing::info!(
            barriers,
            fdatasyncs,
            commands,
            submits,
            "barrier statistics"
        );
        if self
            .gateway
            .store
            .stats()
            .halted
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(
                "store closed without a final barrier: it had stopped taking changes (see the error above); nothing after that was acknowledged"
            );
        } else {
            tracing::info!("store closed after a final durability barrier");
        }
        let _ = stop_metrics.send(());
        match metrics_server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "metrics listener failed"),
            Err(e) => tracing::error!(error = %e, "metrics listener panicked"),
        }
        Ok(())
    }

    /// The Handover service, or (`bench --baseline` only) the null one
    /// that measures the RPC stack's own limit.
    fn handover_services(
        &self,
    ) -> (
        Option<HandoverServiceServer<HandoverGrpc>>,
        Option<HandoverServiceServer<crate::grpc::null::NullHandover>>,
    ) {
        let max_message = self.config.limits.max_document_bytes + 64 * 1024;
        let handover = HandoverServiceServer::new(
            HandoverGrpc::new(self.gateway.clone()).with_metrics(self.metrics.clone()),
        )
        .max_decoding_message_size(max_message)
        // An answer holds at most `max_pull_bytes`, or one delivery larger
        // than that: its document rendered in the recipient's format, which
        // for a list-heavy summary is several times its size as sent (FHIR
        // is 3.3× the model's JSON for a list of medicines, and protobuf is
        // smaller than JSON). Refusing to encode it would fail every attempt.
        .max_encoding_message_size(
            max_message
                .saturating_mul(16)
                .max(self.config.queue.max_pull_bytes),
        )
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate);
        // `bench --baseline` only: the RPC stack's own limit.
        if self.null_handover {
            tracing::warn!("serving the null handover (bench baseline): nothing is stored");
            let null = HandoverServiceServer::new(crate::grpc::null::NullHandover::default())
                .max_decoding_message_size(max_message)
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate);
            (None, Some(null))
        } else {
            (Some(handover), None)
        }
    }

    /// PDS lookups, beside (never in) the submit path.
    fn spawn_pds(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.pds.take().map(|client| {
            let (gateway, metrics) = (self.gateway.clone(), self.metrics.clone());
            crate::pds::spawn(
                client,
                &self.config.pds,
                gateway,
                metrics,
                self.shutdown_tx.subscribe(),
            )
        })
    }

    /// The MESH edge: pushes MESH-reached organisations' deliveries and
    /// reads the gateway's MESH inbox, through the application layer.
    fn spawn_mesh(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        self.mesh.take().map(|client| {
            let (gateway, metrics) = (self.gateway.clone(), self.metrics.clone());
            crate::mesh::spawn(
                client,
                &self.config.mesh,
                gateway,
                metrics,
                self.shutdown_tx.subscribe(),
            )
        })
    }

    fn accept_limits(&self) -> crate::tls::AcceptLimits {
        let l = &self.config.limits;
        crate::tls::AcceptLimits {
            handshake_timeout: Duration::from_millis(
                self.config.tls.handshake_timeout_ms.unwrap_or(10_000),
            ),
            admission: crate::tls::AdmissionLimits {
                max_handshakes: l.max_handshakes,
                max_handshakes_per_network: l.max_handshakes_per_network,
                per_address_per_second: l.handshakes_per_address_per_second,
                per_address_burst: l.handshake_burst_per_address,
                stall: Duration::from_millis(l.handshake_stall_ms),
            },
            max_connections_per_identity: l.max_connections_per_identity,
        }
    }

    /// Sweeps deadlines and leases, and samples the mailboxes for the
    /// metrics and the dashboard's trends, until shutdown.
    fn spawn_sweeper(
        &self,
        trends: Arc<crate::operator::trends::Trends>,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.gateway.store.clone();
        let metrics = self.metrics.clone();
        let clock = self.gateway.clock.clone();
        let every = Duration::from_millis(self.config.queue.sweep_interval_ms);
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.changed() => break,
                }
                match store.sweep().await {
                    Ok(outcome) => report_sweep(&outcome),
                    Err(e) => tracing::error!(error = %e, "sweep failed"),
                }
                match store.mailbox_stats().await {
                    Ok(stats) => {
                        trends.record(trend_sample(&stats, &metrics, clock.now_ms()));
                        metrics.set_mailboxes(mailbox_rows(stats));
                    }
                    Err(e) => tracing::error!(error = %e, "mailbox statistics failed"),
                }
            }
        })
    }

    /// Recomputes the continuity indicators for the metrics and the
    /// dashboard every [`crate::operator::continuity::REFRESH`], until shutdown.
    fn spawn_continuity(
        &self,
        latest: Arc<crate::operator::continuity::LatestContinuity>,
    ) -> tokio::task::JoinHandle<()> {
        let gateway = self.gateway.clone();
        let metrics = self.metrics.clone();
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            loop {
                let began = std::time::Instant::now();
                match gateway
                    .continuity_report(crate::operator::continuity::window())
                    .await
                {
                    Ok(c) => {
                        tracing::info!(
                            rows = c.rows.len(),
                            elapsed_ms = began.elapsed().as_millis() as u64,
                            "continuity indicators computed"
                        );
                        metrics.set_continuity(&c);
                        latest.set(c);
                    }
                    Err(e) => tracing::error!(error = %e, "continuity indicators failed"),
                }
                tokio::select! {
                    () = tokio::time::sleep(crate::operator::continuity::REFRESH) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    }

    /// The tasks that run beside the server until shutdown: the sweeper,
    /// retention, continuity, held-copy routing, and PDS and MESH when on.
    fn spawn_background(
        &mut self,
        trends: Arc<crate::operator::trends::Trends>,
        continuity: Arc<crate::operator::continuity::LatestContinuity>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = vec![
            self.spawn_claims_restore(),
            self.spawn_sweeper(trends),
            self.spawn_retention(),
            self.spawn_continuity(continuity),
            self.spawn_held_routing(),
        ];
        if self.gateway.store.engine() == crate::store::EngineKind::Postgres {
            tasks.push(self.spawn_registry_refresh());
            tasks.push(self.spawn_witness_recorder());
        }
        tasks.extend(self.spawn_pds());
        tasks.extend(self.spawn_mesh());
        tasks
    }

    /// Rebuilds the failed-claim counters from the audit trail beside
    /// serving (a claim that comes first rebuilds them itself:
    /// `ClaimGuard::deferred`).
    fn spawn_claims_restore(&self) -> tokio::task::JoinHandle<()> {
        let gateway = self.gateway.clone();
        tokio::task::spawn_blocking(move || {
            let now = gateway.clock.now_ms();
            if let Err(e) = gateway.claims.restore(&gateway.store, now) {
                tracing::error!(error = %e, "failed claims could not be read back from the audit trail; the first claim tries again");
            }
        })
    }

    /// Reads the registry again when another node changed it (PostgreSQL:
    /// NOTIFY), and every [`crate::handover::registry_refresh::REFRESH`] in
    /// case a notification was missed (the LISTEN connection was down),
    /// until shutdown.
    fn spawn_registry_refresh(&self) -> tokio::task::JoinHandle<()> {
        let gateway = self.gateway.clone();
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            let signal = gateway.store.registry_signal();
            loop {
                // Armed before reading: a change made meanwhile wakes it.
                let next = signal.notified();
                tokio::pin!(next);
                next.as_mut().enable();
                if let Err(e) = gateway.refresh_registry().await {
                    tracing::error!(error = %e, "reading the registry again failed");
                }
                tokio::select! {
                    () = &mut next => {}
                    () = tokio::time::sleep(crate::handover::registry_refresh::REFRESH) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    }

    /// Records the audit chain's head in this node's witness at start and
    /// every [`crate::store::pg::witness::EVERY`] (PostgreSQL; the store
    /// records it once more when it closes), until shutdown.
    fn spawn_witness_recorder(&self) -> tokio::task::JoinHandle<()> {
        let store = self.gateway.store.clone();
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            let Some(pg) = store.postgres() else { return };
            loop {
                if let Err(e) = pg.record_witness().await {
                    tracing::error!(error = %e, "recording the PostgreSQL witness failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(crate::store::pg::witness::EVERY) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    }

    /// Routes held treatment copies on at start (a registry changed while
    /// the gateway was stopped) and every [`HELD_ROUTING_EVERY`], until
    /// shutdown; a registry change through the gateway routes them at once.
    fn spawn_held_routing(&self) -> tokio::task::JoinHandle<()> {
        let gateway = self.gateway.clone();
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            loop {
                if let Err(e) = gateway
                    .route_held_copies(crate::handover::ROUTING_ACTOR)
                    .await
                {
                    tracing::error!(error = %e, "routing held treatment copies failed");
                }
                tokio::select! {
                    () = tokio::time::sleep(HELD_ROUTING_EVERY) => {}
                    _ = stop.changed() => break,
                }
            }
        })
    }

    /// Runs the retention pass at its interval (at once again after a full
    /// batch) until shutdown.
    fn spawn_retention(&self) -> tokio::task::JoinHandle<()> {
        // On PostgreSQL every node runs it; one at a time does the work
        // (store/pg/retention.rs).
        let store = self.gateway.store.clone();
        let metrics = self.metrics.clone();
        let every = Duration::from_millis(self.config.retention.interval_ms);
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            let mut backlog = false;
            loop {
                // A full batch last time: carry on at once (still one
                // bounded writer job at a time, between other batches).
                if !backlog {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        _ = stop.changed() => break,
                    }
                }
                backlog = false;
                let started = std::time::Instant::now();
                match store.retention().await {
                    Ok(outcome) => {
                        report_retention(&outcome, started.elapsed());
                        metrics.set_retention(&outcome.stats);
                        backlog = outcome.backlog;
                    }
                    Err(e) => tracing::error!(error = %e, "retention pass failed"),
                }
            }
        })
    }

    /// Serves on `listener` until `shutdown` completes, then stops accepting,
    /// lets in-flight calls finish within the grace period, and closes the
    /// store after a final durability barrier.
    ///
    /// # Errors
    /// Server or store failure.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        // Printed as `127.0.0.1:7443`, or `unknown`: never `Some(...)`.
        let addr = listener
            .local_addr()
            .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
        let trends = Arc::new(crate::operator::trends::Trends::default());
        let continuity = Arc::new(crate::operator::continuity::LatestContinuity::default());
        let (metrics_server, stop_metrics) =
            self.start_metrics(trends.clone(), continuity.clone())?;
        let mllp = self.start_mllp()?;
        let l = self.config.limits.clone();
        let accept = self.accept_limits();
        let (incoming, connect_refusals) = crate::tls::incoming(
            listener,
            self.tls.clone(),
            accept,
            Arc::new(AuditRefusals(self.gateway.store.clone())),
        );
        let tally = RefusalTally::default();
        let rate_limit = RateLimitLayer::of(&l, tally.clone());
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        let (handover, null_handover) = self.handover_services();

        let (health, health_service) = health_services().await;
        let (reflection_v1, reflection_v1alpha) = reflection_services()?;
        let operator = OperatorServiceServer::new(OperatorGrpc::new(self.gateway.clone()))
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Deflate);

        let mut tasks = self.spawn_background(trends.clone(), continuity);
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        tasks.push(spawn_store_watch(
            health.clone(),
            self.gateway.store.clone(),
            Duration::from_secs(self.config.store.stall_seconds),
            self.shutdown_tx.subscribe(),
        ));
        tasks.push(spawn_forget(
            rate_limit.clone(),
            tally.clone(),
            self.gateway.store.clone(),
        ));
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_max_header_list_size(l.max_header_list_bytes)
            .max_concurrent_streams(l.max_concurrent_streams)
            .http2_max_pending_accept_reset_streams(Some(64))
            .max_connection_age(Duration::from_secs(l.max_connection_age_seconds))
            .layer(crate::grpc::trace_context::TraceContextLayer::new(
                self.config.telemetry.enabled,
            ))
            .layer(crate::grpc::call_metrics::CallMetricsLayer::new(
                self.metrics.clone(),
            ))
            .layer(rate_limit)
            .layer(DecodeRefusalLayer::new(self.gateway.store.clone()))
            .layer(AroundForHealthLayer::new(
                tower::ServiceBuilder::new()
                    .layer(tower::util::MapErrLayer::new(shed_to_unavailable(
                        tally.clone(),
                    )))
                    .layer(tower::load_shed::LoadShedLayer::new())
                    .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                        l.max_in_flight,
                    )),
            ))
            .add_optional_service(handover)
            .add_optional_service(null_handover)
            .add_service(operator)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = server_stopped.await;
            });
        tokio::pin!(server);
        tracing::info!(%addr, "serving over mutual TLS");
        notify_service_manager(&[sd_notify::NotifyState::Ready]);
        let served = tokio::select! {
            result = &mut server => Some(result),
            () = shutdown => None,
        };
        let result = match served {
            Some(result) => result.map_err(AppError::from),
            None => {
                self.drain(grace, health, stop_server, server.as_mut())
                    .await
            }
        };
        let _ = self.shutdown_tx.send(true);
        drain_mllp(mllp, grace).await;
        // A MESH send cut short is recorded as `sending`: the next start
        // asks MESH by local id before sending again.
        for task in tasks {
            task.abort();
        }
        tally.flush(&self.gateway.store).await;
        // The accept loop's last summary of refused connections.
        let _ = tokio::time::timeout(Duration::from_secs(2), connect_refusals).await;
        self.close_store(stop_metrics, metrics_server).await?;
        result
    }
}

/// Waits (up to `grace`) for the MLLP connections to answer the messages
/// in hand, so none is cut between its durable submit and its ACK.
async fn drain_mllp(mllp: Option<tokio::task::JoinHandle<()>>, grace: Duration) {
    if let Some(mllp) = mllp
        && tokio::time::timeout(grace, mllp).await.is_err()
    {
        tracing::warn!("MLLP connections did not finish within the grace period");
    }
}

/// The per-mailbox gauges from the store's statistics.
fn mailbox_rows(
    stats: Vec<crate::store::MailboxStats>,
) -> Vec<crate::operator::metrics::MailboxRow> {
    stats
        .into_iter()
        .map(|m| crate::operator::metrics::MailboxRow {
            parked: if crate::store::is_parked_mailbox(&m.mailbox) {
                m.depth
            } else {
                0
            },
            depth: m.depth,
            leased: m.leased,
            #[allow(clippy::cast_precision_loss)]
            oldest_age_seconds: m.oldest_age_ms.map_or(0.0, |ms| ms as f64 / 1_000.0),
            overdue: m.overdue,
            quarantined: m.quarantined,
            mailbox: m.mailbox,
        })
        .collect()
}

/// The dashboard's sample of this moment: the live queue (not `@parked`)
/// and the counters of submits and deliveries.
fn trend_sample(
    stats: &[crate::store::MailboxStats],
    metrics: &Metrics,
    now_ms: i64,
) -> crate::operator::trends::Sample {
    let live = stats
        .iter()
        .filter(|m| !crate::store::is_parked_mailbox(&m.mailbox));
    let (submits, delivered) = metrics.totals();
    #[allow(clippy::cast_precision_loss)]
    let oldest_age_seconds = live
        .clone()
        .filter_map(|m| m.oldest_age_ms)
        .max()
        .map_or(0.0, |ms| ms as f64 / 1_000.0);
    crate::operator::trends::Sample {
        at_ms: now_ms,
        depth: live.map(|m| m.depth).sum(),
        oldest_age_seconds,
        submits,
        delivered,
    }
}

/// Logs what a sweep found: missed deadlines are alerts, never a silent state.
/// Only ids and organisation codes: never patient data.
fn report_sweep(outcome: &crate::store::SweepOutcome) {
    if outcome.quarantined > 0 {
        tracing::warn!(
            alert = "delivery_quarantined",
            quarantined = outcome.quarantined,
            "ALERT: deliveries quarantined after their last lease expired unacknowledged: they \
             wait for an operator (ListQuarantine, Redrive once the recipient is fixed)"
        );
    }
    for d in &outcome.newly_overdue {
        tracing::warn!(
            alert = "deadline_missed",
            delivery_id = d.id,
            handover_id = d.handover_id,
            mailbox = %d.mailbox,
            urgent = d.urgent,
            due_ms = d.due_ms,
            "delivery overdue: its deadline passed before it was acknowledged"
        );
    }
}

/// Logs what a retention pass did (counts only). A parked release held past
/// the metadata period is never removed: it is an alert until claimed.
/// How far the wall clock may be ahead of retention's before an alert.
const RETENTION_CLOCK_TOLERANCE_MS: i64 = 60_000;

fn report_retention(outcome: &crate::store::RetentionOutcome, elapsed: Duration) {
    if outcome.shredded + outcome.metadata_removed + outcome.epochs_destroyed > 0 {
        tracing::info!(
            elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            shredded = outcome.shredded,
            metadata_removed = outcome.metadata_removed,
            tombstones_removed = outcome.tombstones_removed,
            keys_rewrapped = outcome.keys_rewrapped,
            epochs_destroyed = outcome.epochs_destroyed,
            "retention pass"
        );
    }
    if outcome.clock_behind_ms > RETENTION_CLOCK_TOLERANCE_MS {
        tracing::error!(
            alert = "retention_clock_behind_wall",
            behind_seconds = outcome.clock_behind_ms / 1_000,
            "the wall clock moved further ahead than the time that passed: retention runs on the \
             time that passed, so nothing is removed early; check the clock's time source. If the \
             clock is right now (it had been slow), a restart lets retention catch up"
        );
    }
    if outcome.parked_past_period > 0 {
        tracing::warn!(
            alert = "parked_past_retention",
            parked = outcome.parked_past_period,
            "parked releases held longer than the metadata period: they are never removed, claim them"
        );
    }
}

/// Tells health watchers NOT_SERVING, then ends their streams so that they do
/// not hold the drain open until the grace period runs out.
async fn stop_serving(mut health: tonic_health::server::HealthReporter) {
    set_not_serving(&health).await;
    for name in HEALTH_SERVICES {
        health.clear_service_status(name).await;
    }
}

/// The names health answers for: the server as a whole and each service.
const HEALTH_SERVICES: [&str; 3] = [
    "",
    <HandoverServiceServer<HandoverGrpc> as tonic::server::NamedService>::NAME,
    <OperatorServiceServer<OperatorGrpc> as tonic::server::NamedService>::NAME,
];

async fn set_not_serving(health: &tonic_health::server::HealthReporter) {
    set_all(health, tonic_health::ServingStatus::NotServing).await;
}

async fn set_serving(health: &tonic_health::server::HealthReporter) {
    set_all(health, tonic_health::ServingStatus::Serving).await;
}

async fn set_all(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for name in HEALTH_SERVICES {
        health.set_service_status(name, status).await;
    }
}

/// How often the store watch probes the store, and looks at what it found.
const PROBE_EVERY: Duration = Duration::from_secs(2);
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Watches the store for the two ways it stops serving, and tells health:
/// - it **halted** (a failed durability barrier or commit, e.g. a full
///   disk): every change is refused until a restart, so health answers
///   `NOT_SERVING` for good and a supervisor (the container health check,
///   an orchestrator) restarts the gateway instead of leaving it stuck;
/// - it **stalled**: no probe ([`Store::probe`]: a call through the writer
///   and the barrier, or a commit on PostgreSQL) has passed for
///   `stall_after` (a hung `fdatasync`, a lost synchronous standby, every
///   database connection stuck). Every call waits on the store and holds
///   its in-flight permit meanwhile, so health answers `NOT_SERVING` until
///   a probe passes again, and a load balancer sends callers elsewhere.
///
/// It ends when the gateway starts draining (`stop`): draining owns health
/// from then on.
fn spawn_store_watch(
    health: tonic_health::server::HealthReporter,
    store: Store,
    stall_after: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let origin = tokio::time::Instant::now();
        // When a probe last passed, ms after `origin`.
        let passed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let _prober = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
            let (store, passed) = (store.clone(), passed.clone());
            async move {
                loop {
                    if store.probe().await.is_ok() {
                        let at = u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
                        passed.store(at, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            }
        }));
        let mut stalled = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(WATCH_EVERY) => {}
                _ = stop.changed() => return,
            }
            if store
                .stats()
                .halted
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                tracing::error!(
                    alert = "store_halted",
                    "ALERT: the store refuses every change until the gateway is restarted; health now answers NOT_SERVING"
                );
                set_not_serving(&health).await;
                return;
            }
            let since = Duration::from_millis(passed.load(std::sync::atomic::Ordering::Relaxed));
            let waiting = origin.elapsed().saturating_sub(since);
            if waiting >= stall_after && !stalled {
                stalled = true;
                tracing::error!(
                    alert = "store_stalled",
                    waiting_ms = u64::try_from(waiting.as_millis()).unwrap_or(u64::MAX),
                    "ALERT: nothing has passed the store for {} s (a hung disk sync, a lost synchronous standby, every database connection stuck); calls wait, and health answers NOT_SERVING until one passes",
                    waiting.as_secs()
                );
                set_not_serving(&health).await;
            } else if waiting < stall_after && stalled && !*stop.borrow() {
                stalled = false;
                tracing::warn!("the store passes calls again; health answers SERVING");
                set_serving(&health).await;
            }
        }
    })
}

/// Flushes the refusal tally every second and forgets idle rate-limit
/// state every minute.
fn spawn_forget(
    rate_limit: RateLimitLayer,
    tally: RefusalTally,
    store: Store,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for tick in 1u64.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tally.flush(&store).await;
            if tick % 60 == 0 {
                rate_limit.forget_idle();
            }
        }
    })
}

/// gRPC health, SERVING for both services from the start.
async fn health_services() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<HandoverServiceServer<HandoverGrpc>>()
        .await;
    health
        .set_serving::<OperatorServiceServer<OperatorGrpc>>()
        .await;
    (health, health_service)
}

/// gRPC reflection (v1 and v1alpha) over our descriptors, the vendored
/// error details and health.
fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    AppError,
> {
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(crate::grpc::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((
        reflection(tonic_reflection::server::Builder::configure()).build_v1()?,
        reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?,
    ))
}
