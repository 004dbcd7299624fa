//! Accepting MLLP connections: mutual TLS through the gRPC listener's own
//! accept path (`tls::incoming`: the same CA, CRL, handshake admission and
//! identity from the SAN), or plain TCP on loopback with the configured
//! sender; then the connection limits, and one task per connection reading
//! frames and answering each message.
//!
//! Refusals (too many connections, a frame over the size limit or
//! malformed, an idle connection closed) go to the same refusal sink as the
//! TLS accept loop's (the audit trail, action `connect`, the reason starting
//! `MLLP`) and are counted in `throughcare_mllp_refusals_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tonic::transport::server::Connected;

use super::answer;
use super::frame::{self, FrameError, FrameReader};
use crate::clinical::OdsCode;
use crate::handover::{Caller, Gateway};
use crate::journey::Format;
use crate::operator::metrics::Metrics;
use crate::tls::{AcceptLimits, PeerIdentity, Refusal, RefusalSink, ReloadableConfig};

/// The listener's limits.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest message, bytes.
    pub max_message_bytes: usize,
    /// Longest wait for a connection's next whole message.
    pub idle_timeout: Duration,
    /// Open connections in total.
    pub max_connections: usize,
    /// Open connections per identity.
    pub max_connections_per_identity: usize,
}

/// How connections are authenticated.
pub enum Transport {
    /// Mutual TLS.
    Tls {
        /// The gateway's TLS material (reloaded as for gRPC).
        config: ReloadableConfig,
        /// Handshake admission and deadline.
        limits: AcceptLimits,
    },
    /// Plain TCP: every connection speaks for this organisation. For tests
    /// that drive the listener in-process only: no configuration reaches
    /// it (the gateway's MLLP is mutual TLS, `mllp.plain` is refused).
    #[doc(hidden)]
    Plain(OdsCode),
}

/// What every connection task shares.
struct Shared {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    refusals: Arc<dyn RefusalSink>,
    settings: Settings,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

/// One caller on one connection.
struct Peer {
    caller: Caller,
    actor: String,
    remote: SocketAddr,
}

/// A place among the open connections, given back when dropped.
struct Slot {
    shared: Arc<Shared>,
    actor: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.actor) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.actor);
            }
        }
        self.shared.metrics.set_mllp_connections(open.0);
    }
}

impl Shared {
    /// A slot for `actor`, or the refusal's metric word and text.
    fn admit(self: &Arc<Self>, actor: &str) -> Result<Slot, (&'static str, String)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.settings;
        if open.0 >= s.max_connections {
            return Err((
                "connection_limit",
                format!("more than {} open MLLP connections", s.max_connections),
            ));
        }
        let mine = open.1.get(actor).copied().unwrap_or(0);
        if mine >= s.max_connections_per_identity {
            return Err((
                "identity_connection_limit",
                format!(
                    "more than {} open MLLP connections for this identity",
                    s.max_connections_per_identity
                ),
            ));
        }
        open.0 += 1;
        *open.1.entry(actor.to_owned()).or_default() += 1;
        self.metrics.set_mllp_connections(open.0);
        Ok(Slot {
            shared: self.clone(),
            actor: actor.to_owned(),
        })
    }

    /// Audits and counts a refusal (`metric` is the label word).
    async fn refuse(&self, peer: &Peer, metric: &'static str, why: String) {
        tracing::info!(caller = %peer.actor, remote = %peer.remote, reason = %why, "MLLP refusal");
        self.metrics.mllp_refused(metric);
        self.refusals
            .record(Refusal {
                actor: peer.actor.clone(),
                reason: format!("MLLP {why}"),
            })
            .await;
    }
}

/// Resolves once the gateway is shutting down (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Serves MLLP on `listener` until `shutdown` turns true; the task ends once
/// every connection has answered the message it was handling. Refused
/// connections and handshakes go to `refusals`.
pub fn spawn(
    listener: TcpListener,
    transport: Transport,
    (gateway, metrics, refusals): (Arc<Gateway>, Arc<Metrics>, Arc<dyn RefusalSink>),
    settings: Settings,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let shared = Arc::new(Shared {
        gateway,
        metrics,
        refusals,
        settings,
        open: Mutex::new((0, HashMap::new())),
    });
    tokio::spawn(async move {
        match transport {
            Transport::Tls { config, limits } => {
                serve_tls(listener, (config, limits), shared, shutdown).await;
            }
            Transport::Plain(sender) => serve_plain(listener, sender, shared, shutdown).await,
        }
    })
}

async fn serve_tls(
    listener: TcpListener,
    (config, limits): (ReloadableConfig, AcceptLimits),
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Per-identity limits are this listener's own (counted with the total).
    let limits = AcceptLimits {
        max_connections_per_identity: usize::MAX,
        ..limits
    };
    let sink = shared.refusals.clone();
    let (mut incoming, housekeeping) = crate::tls::incoming(listener, config, limits, sink);
    let mut conns = JoinSet::new();
    let stop = shutdown.clone();
    loop {
        tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(conn)) => {
                    let info = conn.connect_info();
                    let caller = match info.identity {
                        PeerIdentity::Organisation(code) => Caller::Organisation(code),
                        PeerIdentity::Operator(name) => Caller::Operator(name),
                    };
                    let peer = Peer { actor: caller.actor(), caller, remote: info.remote };
                    conns.spawn(connection(conn, peer, shared.clone(), stop.clone()));
                }
                Some(Err(e)) => tracing::warn!(error = %e, "MLLP accept failed"),
                None => break,
            },
            () = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(incoming);
    while conns.join_next().await.is_some() {}
    let _ = housekeeping.await;
}

async fn serve_plain(
    listener: TcpListener,
    sender: OdsCode,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    let _ = tcp.set_nodelay(true);
                    let caller = Caller::Organisation(sender.clone());
                    let peer = Peer { actor: caller.actor(), caller, remote };
                    conns.spawn(connection(tcp, peer, shared.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "MLLP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// One connection: admitted against the limits, then its messages.
async fn connection<S>(stream: S, peer: Peer, shared: Arc<Shared>, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let slot = match shared.admit(&peer.actor) {
        Ok(slot) => slot,
        Err((metric, why)) => {
            drop(stream);
            shared.refuse(&peer, metric, why).await;
            return;
        }
    };
    if let Some(mut refused) = session(stream, &peer, &shared, shutdown).await {
        // The sender may reconnect at once: its slot is free while the
        // rest of its refused frame is read.
        drop(slot);
        linger(&mut refused).await;
    }
}

/// Reads and answers messages until the peer closes, a limit is hit, or
/// the gateway shuts down (after answering the message in hand).
/// Returns the stream when it is to be closed with [`linger`] (an AE for a
/// frame over the limit went out).
async fn session<S>(
    mut stream: S,
    peer: &Peer,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) -> Option<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let s = &shared.settings;
    let mut reader = FrameReader::new(s.max_message_bytes);
    loop {
        let next = tokio::select! {
            biased;
            () = stopped(&mut shutdown) => return None,
            next = tokio::time::timeout(s.idle_timeout, reader.next(&mut stream)) => next,
        };
        // Whether the AE for a frame over the limit went out: then the
        // sender's rest is read before closing (see [`linger`]).
        let mut answered = false;
        let (metric, why) = match next {
            Ok(Ok(Some(message))) => {
                let started = Instant::now();
                let a = answer::answer(&shared.gateway, &peer.caller, &message).await;
                shared.metrics.submitted(
                    a.event,
                    Some(Format::Hl7v2),
                    a.outcome,
                    started.elapsed(),
                );
                let Some(ack) = a.ack else {
                    // Enhanced mode: MSH-15 asked for no acknowledgement here.
                    continue;
                };
                shared.metrics.mllp_acked(a.code.as_str());
                // A peer that stops reading cannot hold the connection (or a drain) forever.
                let written =
                    tokio::time::timeout(s.idle_timeout, frame::write(&mut stream, ack.as_bytes()));
                if !matches!(written.await, Ok(Ok(()))) {
                    return None;
                }
                continue;
            }
            Ok(Ok(None) | Err(FrameError::Io(_))) => return None,
            Err(_) => (
                "idle_timeout",
                format!("no whole message within {} ms", s.idle_timeout.as_millis()),
            ),
            Ok(Err(FrameError::TooLarge { max, head })) => {
                let ack = answer::too_large(&head, max, time::OffsetDateTime::now_utc());
                shared
                    .metrics
                    .mllp_acked(crate::clinical::hl7v2::AckCode::Error.as_str());
                let written =
                    tokio::time::timeout(s.idle_timeout, frame::write(&mut stream, ack.as_bytes()))
                        .await;
                answered = matches!(written, Ok(Ok(())));
                (
                    "message_too_large",
                    format!("message over the {max}-byte limit"),
                )
            }
            Ok(Err(e @ (FrameError::Malformed(_) | FrameError::Truncated))) => {
                ("malformed_frame", e.to_string())
            }
        };
        shared.refuse(peer, metric, why).await;
        return answered.then_some(stream);
    }
}

/// How long, and how much, a refused sender's rest is read after its AE.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// Closes a connection whose sender is still writing (the rest of a frame
/// over the limit) so that the AE already written reaches it: closing with
/// its bytes unread would send a TCP reset, on which the peer's stack
/// discards the AE, and the sender sees only "connection reset" and resends
/// for ever. So: close our side (TLS close_notify), then read and drop what
/// still comes, for at most [`LINGER`] and [`LINGER_BYTES`].
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(LINGER, async {
        let _ = stream.shutdown().await;
        let mut sink = vec![0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
