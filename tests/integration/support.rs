//! One way to start the real server for tests: in-process, on 127.0.0.1:0,
//! with real mutual TLS and a fresh dev PKI, stopped by the test (or on drop).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use throughcare::app::{AppError, Prepared};
use throughcare::certs::{CertAuthority, DevPaths};
use throughcare::config::Config;
use throughcare::grpc::pb;
use throughcare::grpc::pb::handover_service_client::HandoverServiceClient;
use throughcare::store::{Clock, ManualClock, Store, SystemClock};
use tonic::transport::Channel;

/// A running gateway.
pub struct TestGateway {
    pub endpoint: String,
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub store: Store,
    /// Where `GET /metrics` is served (plain HTTP).
    pub metrics_addr: std::net::SocketAddr,
    /// The metrics the gateway feeds.
    pub metrics: Arc<throughcare::operator::metrics::Metrics>,
    /// Where MLLP is served, when `[mllp]` is enabled.
    pub mllp_addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), AppError>>>,
}

/// The starting time of manual clocks.
pub const T0: i64 = 1_800_000_000_000;

impl TestGateway {
    /// A gateway with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}, Arc::new(SystemClock)).await
    }

    /// A gateway whose clock the test moves.
    pub async fn start_manual(tweak: impl FnOnce(&mut Config)) -> (Self, ManualClock) {
        let clock = ManualClock::new(T0);
        (
            Self::start_with(tweak, Arc::new(clock.clone())).await,
            clock,
        )
    }

    /// A gateway with default settings on `engine`; `None` (the test
    /// skips, loudly) when PostgreSQL is wanted and not here.
    pub async fn on(engine: Engine) -> Option<Self> {
        Self::on_with(engine, |_| {}, Arc::new(SystemClock)).await
    }

    /// A gateway on `engine` whose clock the test moves (see [`Self::on`]).
    pub async fn manual_on(
        engine: Engine,
        tweak: impl FnOnce(&mut Config),
    ) -> Option<(Self, ManualClock)> {
        let clock = ManualClock::new(T0);
        let gw = Self::on_with(engine, tweak, Arc::new(clock.clone())).await?;
        Some((gw, clock))
    }

    /// A gateway on `engine` with settings changed by `tweak` (see [`Self::on`]).
    pub async fn on_with(
        engine: Engine,
        tweak: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> Option<Self> {
        let url = match engine {
            Engine::Sled => None,
            Engine::Postgres => Some(postgres_database("a gateway test")?),
        };
        Some(
            Self::start_with(
                |c| {
                    if let Some(url) = &url {
                        use_postgres(c, url);
                    }
                    tweak(c);
                },
                clock,
            )
            .await,
        )
    }

    /// A gateway with settings changed by `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config), clock: Arc<dyn Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().join("data"),
            certs_dir: dir.path().join("certs"),
            dev_certs: true,
            shutdown_grace_ms: 2_000,
            metrics: throughcare::config::MetricsConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
            },
            ..Config::default()
        };
        tweak(&mut config);
        Self::start_in(dir, config, clock).await
    }

    /// A gateway on an existing directory and configuration (restarts).
    pub async fn start_in(dir: tempfile::TempDir, config: Config, clock: Arc<dyn Clock>) -> Self {
        let mut prepared = Prepared::new(config.clone(), clock).expect("gateway prepares");
        let metrics_addr = prepared.bind_metrics().expect("metrics listener binds");
        let mllp_addr = prepared.bind_mllp().expect("MLLP listener binds");
        let metrics = prepared.metrics().clone();
        let store = prepared.store().clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(prepared.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            endpoint,
            dir,
            config,
            store,
            metrics_addr,
            metrics,
            mllp_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn certs(&self) -> PathBuf {
        self.config.certs_dir.clone()
    }

    pub fn paths(&self) -> DevPaths {
        DevPaths { dir: self.certs() }
    }

    /// A client as dev PKI identity `name`.
    pub async fn client(&self, name: &str) -> HandoverServiceClient<Channel> {
        throughcare::cli::client::handover(&self.endpoint, &self.certs(), name)
            .await
            .expect("client connects")
    }

    /// An operator client as the dev PKI's operator.
    pub async fn operator(&self) -> pb::operator_service_client::OperatorServiceClient<Channel> {
        throughcare::cli::client::operator(&self.endpoint, &self.certs(), "operator-oncall")
            .await
            .expect("operator connects")
    }

    /// An operator-service client presenting dev PKI identity `name`.
    pub async fn operator_as(
        &self,
        name: &str,
    ) -> pb::operator_service_client::OperatorServiceClient<Channel> {
        throughcare::cli::client::operator(&self.endpoint, &self.certs(), name)
            .await
            .expect("client connects")
    }

    /// A client presenting `cert`/`key` PEM files, trusting `ca` PEM.
    pub async fn client_with(
        &self,
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
    ) -> Result<HandoverServiceClient<Channel>, tonic::transport::Error> {
        throughcare::tls::client_channel(&self.endpoint, ca, cert, key)
            .await
            .map(HandoverServiceClient::new)
    }

    /// The dev CA, to issue more certificates.
    pub fn ca(&self) -> CertAuthority {
        let p = self.paths();
        CertAuthority::load(&p.ca_cert(), &p.ca_key()).unwrap()
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.paths().ca_cert()).unwrap()
    }

    /// Stops the gateway and waits for it; returns the directory and config
    /// for a restart.
    pub async fn stop(mut self) -> (tempfile::TempDir, Config) {
        self.shutdown().await;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.config.clone())
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().expect("gateway stops cleanly");
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Invented patients: NHS numbers in the 999 test range with valid check digits.
pub fn nhs(i: u32) -> String {
    let mut n = 999_000_000u64 + u64::from(i) * 7;
    loop {
        let digits: Vec<u64> = n.to_string().bytes().map(|b| u64::from(b - b'0')).collect();
        let sum: u64 = digits.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
        let check = (11 - sum % 11) % 11;
        if check != 10 && !digits.iter().all(|d| *d == digits[0]) {
            return format!("{n}{check}");
        }
        n += 1;
    }
}

/// A native summary of invented patient `patient`, with `marker` as the
/// follow-up's service so a test can recognise the delivery.
pub fn native_for(patient: u32, marker: &str) -> pb::submit_request::Document {
    let summary = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        None,
        marker,
    );
    pb::submit_request::Document::Native(throughcare::grpc::summary::to_wire(&summary))
}

/// A release of patient `patient` to `to`.
pub fn release(message_id: &str, patient: u32, to: &[&str], marker: &str) -> pb::SubmitRequest {
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Release.into(),
        patient: Some(pb::PatientRef {
            nhs_number: nhs(patient),
            prison_number: String::new(),
            date_of_birth: "1985-06-15".into(),
        }),
        destinations: to.iter().map(|s| (*s).to_owned()).collect(),
        document: Some(native_for(patient, marker)),
    }
}

/// Pull up to `max`, rendered natively.
/// A pull that long-polls up to `seconds`: on PostgreSQL a delivery whose
/// row another transaction holds for a moment (the sweeper, another node)
/// is skipped, not waited for, and a waiting pull takes it a moment later.
pub fn pull_waiting(max: u32, seconds: i64) -> pb::PullRequest {
    pb::PullRequest {
        wait: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..pull(max)
    }
}

pub fn pull(max: u32) -> pb::PullRequest {
    pb::PullRequest {
        max_deliveries: max,
        lease: None,
        wait: None,
        format: pb::DocumentFormat::Native.into(),
    }
}

/// An admission of patient `patient` at YP001, whose registered GP is YG001
/// (routed there as an admission notice, which carries no marker).
pub fn admission(message_id: &str, patient: u32) -> pb::SubmitRequest {
    let mut summary = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        Some("YG001".parse().unwrap()),
        "admission",
    );
    summary.custody.release_date = None;
    summary.custody.release_address = None;
    pb::SubmitRequest {
        message_id: message_id.into(),
        event: pb::JourneyEvent::Admission.into(),
        patient: None,
        destinations: Vec::new(),
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(&summary),
        )),
    }
}

/// The marker of a natively rendered delivery (see [`native_for`]);
/// `"admission"` for an admission notice.
pub fn text_of(d: &pb::Delivery) -> String {
    if d.event() == pb::JourneyEvent::Admission {
        return "admission".into();
    }
    match &d.document {
        Some(pb::delivery::Document::Native(s)) => s
            .follow_ups
            .first()
            .map(|f| f.service.clone())
            .unwrap_or_default(),
        other => panic!("expected a native document, got {other:?}"),
    }
}

/// Field names of the BadRequest violations in a status.
pub fn violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Track by message id, as the sender.
pub async fn track_message(
    client: &mut HandoverServiceClient<Channel>,
    id: &str,
) -> pb::TrackResponse {
    client
        .track(pb::TrackRequest {
            handover: Some(pb::track_request::Handover::MessageId(id.into())),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Pull up to 50 deliveries (native) and acknowledge each; returns them.
pub async fn pull_and_ack(client: &mut HandoverServiceClient<Channel>) -> Vec<pb::Delivery> {
    let got = client.pull(pull(50)).await.unwrap().into_inner().deliveries;
    for d in &got {
        client
            .ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
    }
    got
}

/// The real binary, built by cargo for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

/// A free port on 127.0.0.1 (free when asked: bind it right away).
///
/// Below the kernel's ephemeral range (32768 and up on Linux), so that no
/// client connection of another test can take it as its local port while a
/// server is restarted on it (a kill -9 test's restart would then fail to
/// bind). Ports are handed out in turn from an offset of this process, each
/// checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = u16::try_from(LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {LOW} and {}", LOW + SPAN)
}

/// A process of the real binary, killed and reaped when dropped.
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The engines a conformance test runs against: sled always, PostgreSQL
/// when `tests/run` started a cluster (see [`postgres_database`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sled,
    Postgres,
}

/// The variable `tests/run` sets to its cluster's connection string (the
/// maintenance database; each test gets a database of its own).
pub const POSTGRES_ENV: &str = "THROUGHCARE_TEST_POSTGRES";
/// Set by `tests/run`: a test that needs PostgreSQL fails without it
/// instead of skipping.
pub const REQUIRE_POSTGRES_ENV: &str = "THROUGHCARE_REQUIRE_POSTGRES";

/// A fresh, empty database on the test cluster, as a connection string;
/// `None` (and a loud SKIPPED line) when no cluster is configured, unless
/// `tests/run` requires one, when it panics.
pub fn postgres_database(test: &str) -> Option<String> {
    let Some(base) = std::env::var(POSTGRES_ENV).ok().filter(|v| !v.is_empty()) else {
        assert!(
            std::env::var(REQUIRE_POSTGRES_ENV).is_err(),
            "{test}: {REQUIRE_POSTGRES_ENV} is set but {POSTGRES_ENV} is not: tests/run must start PostgreSQL"
        );
        eprintln!(
            "SKIPPED {test} on PostgreSQL: {POSTGRES_ENV} is not set (tests/run starts a cluster and sets it)"
        );
        return None;
    };
    let name = format!("tc_{}", uuid::Uuid::new_v4().simple());
    let create = format!("CREATE DATABASE {name}");
    let admin = base.clone();
    // Its own thread and runtime: callers may be inside a runtime or not.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("the test cluster accepts connections");
            tokio::spawn(connection);
            client.batch_execute(&create).await.unwrap();
        });
    })
    .join()
    .unwrap();
    Some(format!("{base} dbname={name}"))
}

/// `config` set to use PostgreSQL database `url` (loopback, so no TLS).
pub fn use_postgres(config: &mut Config, url: &str) {
    config.store.engine = throughcare::store::EngineKind::Postgres;
    config.store.postgres_url = Some(url.to_owned());
    // The test cluster is one server: no synchronous standby.
    config.store.postgres_require_synchronous_standby = false;
    config.store.postgres_pool_size = 8;
}

/// Records that `delivery` went through MESH and was acknowledged there.
pub async fn record_a_mesh_send(store: &Store, handover: u64, delivery: u64, now_ms: i64) {
    store
        .mesh_put(
            "test",
            throughcare::store::MeshRecord {
                delivery_id: delivery,
                handover_id: handover,
                mailbox: "YG001".into(),
                mesh_mailbox: "X26ABC2".into(),
                local_id: format!("throughcare-{delivery}"),
                message_id: Some("20261130000000000000_ABCDEF".into()),
                state: throughcare::store::MeshState::Acknowledged,
                attempt: 1,
                sends: 1,
                reason: None,
                updated_ms: now_ms,
            },
        )
        .await
        .unwrap();
}

/// The key files in `dir`, as every node on one database shares them.
pub fn key_files(dir: &Path) -> throughcare::store::StoreOptions {
    throughcare::store::StoreOptions {
        master_key_file: Some(dir.join("master-key")),
        audit_key_file: Some(dir.join("audit-key")),
        ..throughcare::store::StoreOptions::default()
    }
}

/// A PostgreSQL node (a store, not a gateway) on database `url` with
/// `options`, asking for a synchronous standby when `require_standby`.
///
/// # Errors
/// As `Store::open_postgres`.
pub fn pg_node(
    url: &str,
    dir: &Path,
    clock: Arc<dyn Clock>,
    options: throughcare::store::StoreOptions,
    require_standby: bool,
) -> Result<Store, throughcare::store::StoreError> {
    let pg = throughcare::store::pg::PgOptions {
        url: url.to_owned(),
        ca_file: None,
        pool_size: 4,
        require_synchronous_standby: require_standby,
    };
    Store::open_postgres(&pg, options, clock, dir)
}

/// `s` as prison `ods` writes it: its own custody episode, its own name as
/// author (a document is sent only by the organisation it names).
pub fn written_by(s: &mut throughcare::clinical::ClinicalSummary, ods: &str) {
    s.custody.establishment = ods.parse().unwrap();
    s.author.organisation = ods.parse().unwrap();
}

/// `r` (a native document) as prison `ods` sends it: see [`written_by`].
pub fn sent_by(mut r: pb::SubmitRequest, ods: &str) -> pb::SubmitRequest {
    if let Some(pb::submit_request::Document::Native(s)) = &mut r.document {
        if let Some(c) = &mut s.custody {
            c.establishment = ods.into();
        }
        if let Some(a) = &mut s.author {
            a.organisation = ods.into();
        }
    }
    r
}

/// A TLS client configuration (HTTP/2 by ALPN) presenting dev PKI identity
/// `name` from `certs`, trusting its CA: for raw connections no gRPC client
/// makes.
pub fn tls_client_config(certs: &Path, name: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let pem = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem(certs.join("ca.pem"))) {
        roots.add(c.unwrap()).unwrap();
    }
    let paths = throughcare::certs::DevPaths {
        dir: certs.to_owned(),
    };
    let (cert, key) = paths.client(name);
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&pem(cert))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem(key)).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// `throughcare admin audit verify --data-dir DATA_DIR` of a stopped store:
/// its output.
pub fn audit_verify(data_dir: &Path) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["admin", "audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap()
}

/// Opens the sled database in `dir`. A store closed just before may still
/// hold its lock for a moment (its last io thread lets go after the drop),
/// so a lock is waited for, up to 5 s; any other error names itself.
pub fn open_sled(dir: &Path) -> sled::Db {
    for _ in 0..100 {
        match sled::open(dir) {
            Err(e) if e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => {
                return other.unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()));
            }
        }
    }
    panic!("{} stayed locked for 5 s", dir.display())
}

/// A new active organisation of `kind` for `PutOrganisation`: native
/// format, no region, no MESH mailbox.
pub fn organisation(
    ods: &str,
    kind: pb::OrganisationKind,
    name: &str,
) -> pb::PutOrganisationRequest {
    pb::PutOrganisationRequest {
        organisation: Some(pb::Organisation {
            ods_code: ods.into(),
            kind: kind.into(),
            name: name.into(),
            format: pb::DocumentFormat::Native.into(),
            region: String::new(),
            mesh_mailbox: String::new(),
            active: true,
        }),
    }
}

/// Where a submit's copies go, in its receipt's order.
pub fn destinations(r: &pb::SubmitResponse) -> Vec<&str> {
    r.deliveries
        .iter()
        .map(|d| d.destination.as_str())
        .collect()
}

/// A gateway over `store` with the dev organisations and default settings,
/// for calling its services or edges without the server; `stopping` says
/// when it shuts down.
pub fn gateway_over(
    store: Store,
    clock: Arc<dyn Clock>,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Arc<throughcare::handover::Gateway> {
    use throughcare::handover::{ClaimGuard, ClaimLimits, Gateway};
    use throughcare::journey::{Registry, SharedRegistry};
    let config = Config::default();
    let claims = ClaimGuard::load(&store, ClaimLimits::default(), None, clock.now_ms()).unwrap();
    Arc::new(Gateway {
        store,
        registry: SharedRegistry::new(
            Registry::new(throughcare::certs::dev_organisations()).unwrap(),
        ),
        deadlines: config.deadlines.to_deadlines(),
        clock,
        keyer: throughcare::audit::PatientKeyer::new(&[7u8; 32]),
        queue: config.queue.clone(),
        limits: throughcare::clinical::Limits::default(),
        shutting_down: stopping,
        claims,
        registry_changes: tokio::sync::Mutex::default(),
        operators: None,
    })
}
