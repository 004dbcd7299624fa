//! The accept loop: admission, the TLS handshake within its deadline, the
//! checks after it, and the housekeeping tick (reload, refusal summaries).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::admission::{self, Admission, AdmissionLimits};
use super::conn::{ConnInfo, Counted, Live, TlsConn};
use super::identity::{IdentityError, PeerIdentity, identity_from_cert};
use super::refusal::{Refusal, RefusalSink, Tally, address_actor, cert_actor, handshake_reason};
use super::reload::ReloadableConfig;
use super::verifier::issued_by_us;

/// Limits on the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptLimits {
    /// Deadline for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Who may start a handshake (see [`admission`](super::admission)).
    pub admission: AdmissionLimits,
    /// Open connections one identity may hold.
    pub max_connections_per_identity: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            admission: AdmissionLimits {
                max_handshakes: 256,
                max_handshakes_per_network: 128,
                per_address_per_second: 8,
                per_address_burst: 256,
                stall: Duration::from_secs(2),
            },
            max_connections_per_identity: 32,
        }
    }
}
/// Once a second: reload the TLS files when they changed (closing open
/// connections whose certificate no longer passes), and hand the refusals
/// counted since the last tick to `sink`; once more when the listener is
/// dropped, so a shutdown loses none.
fn spawn_housekeeping(
    config: ReloadableConfig,
    closed: mpsc::Sender<Result<TlsConn, io::Error>>,
    tally: Arc<Tally>,
    admission: Arc<Admission>,
    sink: Arc<dyn RefusalSink>,
    live: Arc<Live>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut checked = config.generation();
        for n in 1u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                () = closed.closed() => break,
            }
            let cfg = config.clone();
            let live = live.clone();
            // Open connections are checked again when a new configuration is
            // in force (a listener sharing the files may have loaded it) and
            // once a minute, so a certificate that expires is cut as well.
            let cut = tokio::task::spawn_blocking(move || {
                cfg.reload_if_changed();
                let now = cfg.generation();
                if now != checked || n % 60 == 0 {
                    (now, live.recheck(&*cfg.material().verifier))
                } else {
                    (now, Vec::new())
                }
            })
            .await
            .map(|(now, cut)| {
                checked = now;
                cut
            })
            .unwrap_or_default();
            for refusal in cut {
                tracing::info!(reason = %refusal.reason, "open connection closed");
                sink.record(refusal).await;
            }
            for refusal in tally.take() {
                sink.record(refusal).await;
            }
            if n % 60 == 0 {
                admission.forget_idle();
            }
        }
        for refusal in tally.take() {
            sink.record(refusal).await;
        }
    })
}

/// Accepts TCP connections, admits them fairly (see [`admission`](super::admission)),
/// completes the TLS handshake within the limit, and yields the
/// authenticated connections until the returned stream is dropped. Every
/// refused connection goes to `sink`, summarised once a second per actor and
/// reason; the returned handle finishes once the last summary is recorded
/// after the stream is dropped (await it before closing the store). Once a
/// second the TLS files are checked and reloaded when changed (a new CRL
/// applies to new connections from then on).
pub fn incoming(
    listener: TcpListener,
    config: ReloadableConfig,
    limits: AcceptLimits,
    sink: Arc<dyn RefusalSink>,
) -> (
    tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let admission = Arc::new(Admission::new(limits.admission.clone()));
    let open = Arc::new(Counted::<PeerIdentity>::default());
    let live = Arc::new(Live::default());
    let tally = Arc::new(Tally::default());
    let housekeeping = spawn_housekeeping(
        config.clone(),
        tx.clone(),
        tally.clone(),
        admission.clone(),
        sink,
        live.clone(),
    );
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => break,
            };
            let slot = match admission.admit(remote.ip()) {
                Ok((slot, evicted)) => {
                    for ip in evicted {
                        tally.add(Refusal {
                            actor: address_actor(&SocketAddr::new(ip, 0)),
                            reason: "handshake evicted for a newcomer: stalled, or its address or network held more handshakes (handshake table full)".into(),
                        });
                    }
                    slot
                }
                Err(why) => {
                    tally.add(Refusal {
                        actor: address_actor(&remote),
                        reason: why.reason().into(),
                    });
                    drop(tcp);
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let shared = Shared {
                tx: tx.clone(),
                tally: tally.clone(),
                open: open.clone(),
                live: live.clone(),
                config: config.clone(),
                limits: limits.clone(),
            };
            tokio::spawn(handshake(tcp, remote, slot, shared));
        }
    });
    (
        tokio_stream::wrappers::ReceiverStream::new(rx),
        housekeeping,
    )
}

/// What every handshake task of one listener shares.
struct Shared {
    tx: mpsc::Sender<Result<TlsConn, io::Error>>,
    tally: Arc<Tally>,
    open: Arc<Counted<PeerIdentity>>,
    live: Arc<Live>,
    config: ReloadableConfig,
    limits: AcceptLimits,
}

/// One admitted connection: the handshake (unless evicted first), then the
/// connection to the server or its refusal to the tally.
async fn handshake(tcp: TcpStream, remote: SocketAddr, slot: admission::Admitted, s: Shared) {
    let outcome = tokio::select! {
        biased;
        () = slot.evicted.cancelled() => Err(None),
        outcome = authenticate(tcp, remote, &s.config, &s.limits, (&s.open, &s.live)) => outcome,
    };
    // The slot is free (and a refused connection closed) before anything
    // else, so slow audits cannot hold handshakes up. A slot a newcomer
    // took first was counted as evicted, once: its outcome is not.
    if !slot.release() {
        return;
    }
    match outcome {
        Ok(conn) => {
            let _ = s.tx.send(Ok(conn)).await;
        }
        Err(Some(refusal)) => {
            tracing::info!(reason = %refusal.reason, "connection refused");
            s.tally.add(refusal);
        }
        Err(None) => {}
    }
}

/// The TLS handshake and the checks after it; `Err(None)` when the server's
/// own configuration is unusable (logged, not a client's fault).
async fn authenticate(
    tcp: TcpStream,
    remote: SocketAddr,
    config: &ReloadableConfig,
    limits: &AcceptLimits,
    (open, live): (&Arc<Counted<PeerIdentity>>, &Arc<Live>),
) -> Result<TlsConn, Option<Refusal>> {
    let (server_config, presented) = config.for_connection().map_err(|e| {
        tracing::error!(error = %e, "TLS configuration unusable");
        None
    })?;
    let verifier = config.material().verifier.clone();
    // A certificate's names are the caller's own words until the CA vouches
    // for them: only a certificate the gateway's CA issued is named.
    let presented_actor = || match presented
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
    {
        Some(der) if issued_by_us(&*verifier, der) => cert_actor(der, &remote),
        _ => address_actor(&remote),
    };
    let refusal = |actor, reason| Some(Refusal { actor, reason });
    let acceptor = TlsAcceptor::from(server_config);
    let stream = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Err(_) => return Err(refusal(presented_actor(), "TLS handshake timed out".into())),
        Ok(Err(e)) => return Err(refusal(presented_actor(), handshake_reason(&e))),
        Ok(Ok(stream)) => stream,
    };
    let chain: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let identity = chain
        .first()
        .ok_or(IdentityError::NoIdentity)
        .and_then(|c| identity_from_cert(c))
        .map_err(|e| refusal(presented_actor(), e.to_string()))?;
    let Some(slot) = open.take(&identity, limits.max_connections_per_identity) else {
        return Err(refusal(
            identity.to_string(),
            format!(
                "more than {} open connections for this identity",
                limits.max_connections_per_identity
            ),
        ));
    };
    let (live, cancel) = live.register(chain, identity.clone());
    Ok(TlsConn {
        stream,
        info: ConnInfo { identity, remote },
        _slot: slot,
        revoked: Box::pin(cancel.cancelled_owned()),
        _live: live,
    })
}
