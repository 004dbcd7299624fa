//! Who may start a TLS handshake: fair admission that a slow-client flood
//! cannot exhaust.
//!
//! A handshake costs the server a slot (at most `max_handshakes`) for up to
//! the handshake timeout, so half-open connections are the cheap way to lock
//! everyone out. Four rules, in order, when a connection arrives:
//!
//! 1. **Rate per source** (an IPv4 address, an IPv6 /64): a token bucket
//!    (`handshake_burst_per_address`, refilled at
//!    `handshakes_per_address_per_second`). A rate rather than a cap on
//!    handshakes at once, because a whole start of day of practices behind
//!    one HSCN NAT address arrives together (see `docs/edge-limits.md`).
//! 2. **Cap per network** (IPv4 /24, IPv6 /48): at most
//!    `max_handshakes_per_network` in progress, so one network cannot hold
//!    the whole table.
//! 3. **Eviction when full** (the table, or the network's share): the
//!    oldest handshake that has *stalled* (older than `handshake_stall`, far
//!    longer than a real handshake takes) makes room; failing that, the
//!    oldest handshake of the heaviest source in the heaviest network, but
//!    only if that network (or, within one network, that source) holds at
//!    least two more handshakes than the newcomer's: a heavy flooder loses
//!    slots to a light newcomer, never the other way round.
//! 4. Otherwise the newcomer is closed at once (summarised in the audit).
//!
//! So a flood from any number of sources can delay a well-behaved client by
//! at most one handshake, not lock it out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

/// The admission limits (from `[limits]` and `[tls]`).
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Handshakes in progress at once, in all.
    pub max_handshakes: usize,
    /// Handshakes in progress from one network (IPv4 /24, IPv6 /48).
    pub max_handshakes_per_network: usize,
    /// New handshakes one source may start per second, sustained.
    pub per_address_per_second: u32,
    /// New handshakes one source may start at once.
    pub per_address_burst: u32,
    /// A handshake older than this is stalled and may be evicted when the
    /// table is full (the handshake timeout under pressure).
    pub stall: Duration,
}

/// Why a connection was not admitted (fixed words, for the audit summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// Its source is over its handshake rate.
    Rate,
    /// Its network holds its share of handshakes, none evictable.
    Network,
    /// Every handshake slot is taken, none evictable.
    Full,
}

impl NotAdmitted {
    /// The reason, for the audit trail.
    pub fn reason(self) -> &'static str {
        match self {
            NotAdmitted::Rate => {
                "closed before the handshake: over the handshake rate for this address"
            }
            NotAdmitted::Network => {
                "closed before the handshake: this network holds its share of handshakes"
            }
            NotAdmitted::Full => "closed before the handshake: every handshake slot is taken",
        }
    }
}

/// An IPv4 address or IPv6 /64: what one client machine or NAT can use.
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

/// An IPv4 /24 or IPv6 /48.
fn network(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut o = v4.octets();
            o[3] = 0;
            IpAddr::from(o)
        }
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[6..].fill(0);
            IpAddr::from(o)
        }
    }
}

struct Entry {
    ip: IpAddr,
    source: IpAddr,
    network: IpAddr,
    started: Instant,
    evict: CancellationToken,
}

#[derive(Default)]
struct Table {
    next: u64,
    entries: HashMap<u64, Entry>,
    by_source: HashMap<IpAddr, usize>,
    by_network: HashMap<IpAddr, usize>,
}

fn dec(map: &mut HashMap<IpAddr, usize>, key: IpAddr) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        dec(&mut self.by_source, e.source);
        dec(&mut self.by_network, e.network);
        Some(e)
    }

    fn load(map: &HashMap<IpAddr, usize>, key: IpAddr) -> usize {
        map.get(&key).copied().unwrap_or(0)
    }

    /// The handshake to evict for a newcomer from `(src, net)`, among those
    /// in `within` (a network) or all; see the module docs.
    fn victim(
        &self,
        src: IpAddr,
        net: IpAddr,
        within: Option<IpAddr>,
        stall: Duration,
    ) -> Option<u64> {
        let candidates = || {
            self.entries
                .iter()
                .filter(move |(_, e)| within.is_none_or(|w| e.network == w))
        };
        let stalled = candidates()
            .filter(|(_, e)| e.started.elapsed() >= stall)
            .min_by_key(|(_, e)| e.started)
            .map(|(id, _)| *id);
        if stalled.is_some() {
            return stalled;
        }
        // Fair: a handshake of a network at least two heavier than the
        // newcomer's, or, within its network, of a source at least two heavier.
        let (my_net, my_src) = (
            Self::load(&self.by_network, net),
            Self::load(&self.by_source, src),
        );
        let fair = |e: &Entry| {
            if e.network == net {
                Self::load(&self.by_source, e.source) >= my_src + 2
            } else {
                Self::load(&self.by_network, e.network) >= my_net + 2
            }
        };
        candidates()
            .filter(|(_, e)| fair(e))
            .max_by_key(|(_, e)| {
                (
                    Self::load(&self.by_network, e.network),
                    Self::load(&self.by_source, e.source),
                    std::cmp::Reverse(e.started),
                )
            })
            .map(|(id, _)| *id)
    }
}

/// The handshake table and the per-source rate.
pub struct Admission {
    limits: AdmissionLimits,
    table: Arc<Mutex<Table>>,
    rate: DefaultKeyedRateLimiter<IpAddr>,
}

/// One admitted handshake: its slot is given back when dropped; `evicted`
/// fires when a newcomer took it.
pub struct Admitted {
    table: Arc<Mutex<Table>>,
    id: u64,
    /// Cancelled when the handshake is evicted.
    pub evicted: CancellationToken,
}

impl Admitted {
    /// Gives the slot back now; false when a newcomer evicted it first.
    /// The table decides under its lock, so a handshake that ends as it is
    /// evicted is counted once: as evicted, or by its own outcome.
    pub fn release(self) -> bool {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.id)
            .is_some()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.id);
    }
}

impl Admission {
    /// An empty table.
    pub fn new(limits: AdmissionLimits) -> Self {
        let one = NonZeroU32::MIN;
        let quota =
            Quota::per_second(NonZeroU32::new(limits.per_address_per_second).unwrap_or(one))
                .allow_burst(NonZeroU32::new(limits.per_address_burst).unwrap_or(one));
        Self {
            limits,
            table: Arc::default(),
            rate: RateLimiter::keyed(quota),
        }
    }

    /// Admits a handshake from `ip`, evicting others when the rules allow.
    /// Returns the slot and the addresses whose handshakes were evicted.
    ///
    /// # Errors
    /// Why the connection is not admitted.
    pub fn admit(&self, ip: IpAddr) -> Result<(Admitted, Vec<IpAddr>), NotAdmitted> {
        let (src, net) = (source(ip), network(ip));
        if self.rate.check_key(&src).is_err() {
            return Err(NotAdmitted::Rate);
        }
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = Vec::new();
        if Table::load(&t.by_network, net) >= self.limits.max_handshakes_per_network.max(1) {
            let id = t
                .victim(src, net, Some(net), self.limits.stall)
                .ok_or(NotAdmitted::Network)?;
            if let Some(e) = t.remove(id) {
                e.evict.cancel();
                evicted.push(e.ip);
            }
        }
        if t.entries.len() >= self.limits.max_handshakes.max(1) {
            let id = t
                .victim(src, net, None, self.limits.stall)
                .ok_or(NotAdmitted::Full)?;
            if let Some(e) = t.remove(id) {
                e.evict.cancel();
                evicted.push(e.ip);
            }
        }
        t.next += 1;
        let id = t.next;
        let evict = CancellationToken::new();
        t.entries.insert(
            id,
            Entry {
                ip,
                source: src,
                network: net,
                started: Instant::now(),
                evict: evict.clone(),
            },
        );
        *t.by_source.entry(src).or_default() += 1;
        *t.by_network.entry(net).or_default() += 1;
        Ok((
            Admitted {
                table: self.table.clone(),
                id,
                evicted: evict,
            },
            evicted,
        ))
    }

    /// Forgets sources whose buckets are full again (bounded memory).
    pub fn forget_idle(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_handshakes: 8,
            max_handshakes_per_network: 6,
            per_address_per_second: 1,
            per_address_burst: 100,
            stall: Duration::from_secs(60),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_light_newcomer_evicts_the_heaviest_flooder_never_the_reverse() {
        let a = Admission::new(limits());
        let mut held = Vec::new();
        // One network takes its share, then is refused.
        for _ in 0..6 {
            held.push(a.admit(ip("10.0.0.1")).unwrap());
        }
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(NotAdmitted::Network));
        // Others fill the table.
        held.push(a.admit(ip("10.0.1.1")).unwrap());
        held.push(a.admit(ip("10.0.2.1")).unwrap());
        // A newcomer from a fourth network evicts from the heaviest (10.0.0.0/24).
        let (_d3, evicted) = a.admit(ip("10.0.3.1")).unwrap();
        assert_eq!(evicted, [ip("10.0.0.1")]);
        assert!(
            held[0].0.evicted.is_cancelled(),
            "the oldest of the heaviest"
        );
        // Within the flooded network, a fresh address evicts the flooder's oldest.
        let (_d200, evicted) = a.admit(ip("10.0.0.200")).unwrap();
        assert_eq!(evicted, [ip("10.0.0.1")]);
        // The flooder cannot win slots back from lighter sources.
        assert_eq!(a.admit(ip("10.0.0.1")).err(), Some(NotAdmitted::Full));
        // An evicted handshake that ends anyway is not counted again; one
        // that was not evicted gives its slot back.
        let mut held = held.into_iter();
        let (evicted_first, _) = held.next().unwrap();
        assert!(!evicted_first.release(), "counted as evicted already");
        let (kept, _) = held.nth(5).unwrap();
        assert!(!kept.evicted.is_cancelled());
        assert!(kept.release());
    }

    #[test]
    fn a_source_is_limited_by_rate_not_by_count() {
        let a = Admission::new(AdmissionLimits {
            max_handshakes: 256,
            max_handshakes_per_network: 128,
            per_address_per_second: 1,
            per_address_burst: 60,
            stall: Duration::from_secs(2),
        });
        let held: Vec<_> = (0..60).map(|_| a.admit(ip("192.0.2.7")).unwrap()).collect();
        assert_eq!(a.admit(ip("192.0.2.7")).err(), Some(NotAdmitted::Rate));
        assert!(a.admit(ip("192.0.2.8")).is_ok(), "rates are per address");
        drop(held);
    }

    #[test]
    fn stalled_handshakes_are_evicted_first() {
        let a = Admission::new(AdmissionLimits {
            stall: Duration::ZERO,
            ..limits()
        });
        let first = a.admit(ip("10.0.9.1")).unwrap();
        let _rest: Vec<_> = (0..7)
            .map(|i| a.admit(ip(&format!("10.0.{i}.1"))).unwrap())
            .collect();
        // Same load everywhere, but everything is stalled: the oldest goes.
        let _d8 = a.admit(ip("10.0.8.1")).unwrap();
        assert!(first.0.evicted.is_cancelled());
    }

    #[test]
    fn ipv6_sources_are_slash_64_and_networks_slash_48() {
        assert_eq!(source(ip("2001:db8:1:2:3::9")), ip("2001:db8:1:2::"));
        assert_eq!(network(ip("2001:db8:1:2:3::9")), ip("2001:db8:1::"));
        assert_eq!(network(ip("::ffff:10.1.2.3")), ip("10.1.2.0"));
    }
}
