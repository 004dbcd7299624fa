//! Wiring: prepare everything (dev PKI, registry, TLS, store) before a port
//! is bound, then serve until shutdown and drain.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::PatientKeyer;
use crate::config::{Config, ConfigError};
use crate::grpc::limits::{DecodeRefusalLayer, RateLimitLayer, RefusalTally, shed_to_unavailable};
use crate::grpc::pb::handover_server::HandoverServer;
use crate::grpc::{Gateway, HandoverService};
use crate::journey::Registry;
use crate::store::{Clock, Store, StoreError, StoreOptions, SystemClock};
use crate::tls::ReloadableConfig;

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
}

impl AppError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Config(_) => crate::config::EXIT_CONFIG,
            AppError::Store(StoreError::Behind { .. }) => crate::config::EXIT_STORE_BEHIND,
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

impl Prepared {
    /// Loads everything `config` names, creating the dev PKI when allowed and
    /// absent, and opens the store.
    ///
    /// # Errors
    /// Anything that would stop the gateway from serving correctly.
    pub fn new(config: Config, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        config.validate()?;
        if config.dev_certs && !crate::certs::dev_pki_present(&config.certs_dir) {
            crate::certs::init_dev_pki(&config.certs_dir)?;
            tracing::warn!(
                dir = %config.certs_dir.display(),
                "created DEVELOPMENT certificates and registry; never use them in production"
            );
        }
        let registry = Registry::load(&config.registry_path())?;
        let tls = ReloadableConfig::load(config.tls_files())?;
        let secret_path = config
            .patient_key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join("patient-key"));
        let keyer = PatientKeyer::new(&load_or_create_secret(&secret_path)?);
        let q = &config.queue;
        let store = Store::open(
            &config.data_dir,
            StoreOptions {
                max_attempts: q.max_attempts,
                retry_backoff_ms: i64::try_from(q.retry_backoff_ms).unwrap_or(i64::MAX),
                master_key_file: config.master_key_file.clone(),
                ..StoreOptions::default()
            },
            clock,
        )?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let gateway = Arc::new(Gateway {
            store,
            registry,
            keyer,
            queue: config.queue.clone(),
            limits: crate::clinical::Limits {
                max_document_bytes: config.limits.max_document_bytes,
                ..crate::clinical::Limits::default()
            },
            shutting_down: shutdown_rx,
        });
        Ok(Self {
            config,
            gateway,
            tls,
            shutdown_tx,
        })
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

    /// Serves on `listener` until `shutdown` completes, then stops accepting,
    /// lets in-flight calls finish within the grace period, and closes the
    /// store after a final durability barrier.
    ///
    /// # Errors
    /// Server or store failure.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        let l = &self.config.limits;
        let accept = crate::tls::AcceptLimits {
            handshake_timeout: Duration::from_millis(
                self.config.tls.handshake_timeout_ms.unwrap_or(10_000),
            ),
            max_handshakes: l.max_handshakes,
            max_handshakes_per_address: l.max_handshakes_per_address,
            max_connections_per_identity: l.max_connections_per_identity,
        };
        let incoming = crate::tls::incoming(
            listener,
            self.tls.clone(),
            accept,
            Arc::new(AuditRefusals(self.gateway.store.clone())),
        );
        let tally = RefusalTally::default();
        let rate_limit = RateLimitLayer::new(l.requests_per_second, l.request_burst, tally.clone());
        let grace = Duration::from_millis(self.config.shutdown_grace_ms);
        let max_message = self.config.limits.max_document_bytes + 64 * 1024;
        let handover = HandoverServer::new(HandoverService::new(self.gateway.clone()))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message.saturating_mul(4));

        let sweeper = {
            let store = self.gateway.store.clone();
            let every = Duration::from_millis(self.config.queue.sweep_interval_ms);
            let mut stop = self.shutdown_tx.subscribe();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => {}
                        _ = stop.changed() => break,
                    }
                    match store.sweep().await {
                        Ok(0) => {}
                        Ok(n) => tracing::warn!(
                            quarantined = n,
                            "deliveries quarantined after their last lease expired"
                        ),
                        Err(e) => tracing::error!(error = %e, "sweep failed"),
                    }
                }
            })
        };

        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let forget = {
            let (rate_limit, tally, store) = (
                rate_limit.clone(),
                tally.clone(),
                self.gateway.store.clone(),
            );
            tokio::spawn(async move {
                for tick in 1u64.. {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    tally.flush(&store).await;
                    if tick % 60 == 0 {
                        rate_limit.forget_idle();
                    }
                }
            })
        };
        let server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_max_header_list_size(l.max_header_list_bytes)
            .max_concurrent_streams(l.max_concurrent_streams)
            .http2_max_pending_accept_reset_streams(Some(64))
            .max_connection_age(Duration::from_secs(l.max_connection_age_seconds))
            .layer(rate_limit)
            .layer(DecodeRefusalLayer::new(self.gateway.store.clone()))
            .layer(tower::util::MapErrLayer::new(shed_to_unavailable(
                tally.clone(),
            )))
            .layer(tower::load_shed::LoadShedLayer::new())
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                l.max_in_flight,
            ))
            .add_service(handover)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = server_stopped.await;
            });
        tokio::pin!(server);
        tracing::info!(addr = ?addr, "serving over mutual TLS");
        let served = tokio::select! {
            result = &mut server => Some(result),
            () = shutdown => None,
        };
        let result = match served {
            Some(result) => result.map_err(AppError::from),
            None => {
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    "shutting down: draining in-flight calls"
                );
                let _ = self.shutdown_tx.send(true);
                let _ = stop_server.send(());
                match tokio::time::timeout(grace, &mut server).await {
                    Ok(result) => {
                        tracing::info!("drain finished");
                        result.map_err(AppError::from)
                    }
                    Err(_) => {
                        tracing::warn!(
                            "drain did not finish within the grace period; closing anyway"
                        );
                        Ok(())
                    }
                }
            }
        };
        let _ = self.shutdown_tx.send(true);
        sweeper.abort();
        forget.abort();
        tally.flush(&self.gateway.store).await;
        self.gateway.store.close().await?;
        let (barriers, fdatasyncs, commands, submits) = self.gateway.store.stats().snapshot();
        tracing::info!(
            barriers,
            fdatasyncs,
            commands,
            submits,
            "barrier statistics"
        );
        tracing::info!("store closed after a final durability barrier");
        result
    }
}
