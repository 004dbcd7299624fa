//! An authenticated connection: its identity, its place among the
//! connections its identity holds, and its cut when a reload revokes it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::identity::PeerIdentity;
use super::refusal::{Refusal, tls_reason};

/// What a handler knows about its connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The caller, from its certificate.
    pub identity: PeerIdentity,
    /// The caller's address.
    pub remote: SocketAddr,
}

/// An authenticated TLS connection.
pub struct TlsConn {
    pub(super) stream: TlsStream<TcpStream>,
    pub(super) info: ConnInfo,
    pub(super) _slot: ConnectionSlot,
    /// Ready once a reload finds the certificate no longer valid.
    pub(super) revoked: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    pub(super) _live: LiveGuard,
}

impl TlsConn {
    fn cut(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.revoked.as_mut().poll(cx).is_ready().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client certificate no longer valid",
            )
        })
    }
}

/// Open connections with their certificates, so that a reload of the CA or
/// CRL can check them again and close those that no longer pass.
#[derive(Default)]
pub(super) struct Live {
    next: std::sync::atomic::AtomicU64,
    conns: std::sync::Mutex<HashMap<u64, LiveConn>>,
}

struct LiveConn {
    chain: Vec<CertificateDer<'static>>,
    identity: PeerIdentity,
    cancel: tokio_util::sync::CancellationToken,
}

pub(super) struct LiveGuard {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl Live {
    pub(super) fn register(
        self: &Arc<Self>,
        chain: Vec<CertificateDer<'static>>,
        identity: PeerIdentity,
    ) -> (LiveGuard, tokio_util::sync::CancellationToken) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cancel = tokio_util::sync::CancellationToken::new();
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            LiveConn {
                chain,
                identity,
                cancel: cancel.clone(),
            },
        );
        (
            LiveGuard {
                live: self.clone(),
                id,
            },
            cancel,
        )
    }

    /// Closes every open connection whose certificate `verifier` now
    /// refuses; returns the refusals.
    pub(super) fn recheck(&self, verifier: &dyn ClientCertVerifier) -> Vec<Refusal> {
        let now = rustls::pki_types::UnixTime::now();
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = Vec::new();
        for conn in conns.values() {
            let Some((ee, intermediates)) = conn.chain.split_first() else {
                continue;
            };
            if let Err(e) = verifier.verify_client_cert(ee, intermediates, now) {
                conn.cancel.cancel();
                cut.push(Refusal {
                    actor: conn.identity.to_string(),
                    reason: format!("open connection closed: {}", tls_reason(&e)),
                });
            }
        }
        cut
    }
}

impl Connected for TlsConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.cut(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How many connections each key (identity, address) holds; a slot gives
/// its place back when dropped.
pub(super) struct Counted<K: std::hash::Hash + Eq + Clone>(std::sync::Mutex<HashMap<K, usize>>);

impl<K: std::hash::Hash + Eq + Clone> Default for Counted<K> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(HashMap::new()))
    }
}

pub(super) struct Slot<K: std::hash::Hash + Eq + Clone> {
    counted: Arc<Counted<K>>,
    key: K,
}

pub(super) type ConnectionSlot = Slot<PeerIdentity>;

impl<K: std::hash::Hash + Eq + Clone> Counted<K> {
    pub(super) fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<Slot<K>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            counted: self.clone(),
            key: key.clone(),
        })
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = self.counted.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}
