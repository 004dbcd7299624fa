//! Which live delivery goes next: the writer's in-memory index over the
//! `pending` tree, rebuilt from it at start-up.
//!
//! Order inside a mailbox: urgent before routine, then FIFO by delivery id.
//! Per-patient order: only a patient's oldest live delivery in a mailbox can be
//! leased, so a patient's handovers arrive in the order they were sent. A
//! quarantined delivery leaves the index, so it never blocks anyone.

use std::collections::{BTreeSet, HashMap};

/// Scheduling facts about one live delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Receiving mailbox.
    pub mailbox: String,
    /// Keyed hash of the patient.
    pub patient_key: String,
    /// Served first.
    pub urgent: bool,
    /// Attempts so far.
    pub attempt: u32,
    /// Queued (with a not-before time) or leased (until a time).
    pub lease: Slot,
}

/// Whether a live delivery is waiting or out on lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Waiting; may be leased at or after this time.
    Queued {
        /// Earliest lease time, ms.
        not_before_ms: i64,
    },
    /// Leased until this time.
    Leased {
        /// Lease expiry, ms.
        until_ms: i64,
    },
}

#[derive(Debug, Default)]
struct MailboxIndex {
    /// (0 = urgent, 1 = routine; delivery id).
    order: BTreeSet<(u8, u64)>,
    /// Each patient's live deliveries; the first is the only one leasable.
    by_patient: HashMap<String, BTreeSet<u64>>,
}

/// What a scan found for one mailbox.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Deliveries that may be leased now, in serving order.
    pub ready: Vec<u64>,
    /// Deliveries whose lease expired after the last allowed attempt.
    pub exhausted: Vec<u64>,
}

/// The index of every live delivery.
#[derive(Debug, Default)]
pub struct Schedule {
    live: HashMap<u64, Live>,
    mailboxes: HashMap<String, MailboxIndex>,
}

impl Schedule {
    /// Adds a live delivery.
    pub fn insert(&mut self, id: u64, live: Live) {
        let index = self.mailboxes.entry(live.mailbox.clone()).or_default();
        index.order.insert((rank(live.urgent), id));
        index
            .by_patient
            .entry(live.patient_key.clone())
            .or_default()
            .insert(id);
        self.live.insert(id, live);
    }

    /// Removes a delivery that was acknowledged or quarantined.
    pub fn remove(&mut self, id: u64) -> Option<Live> {
        let live = self.live.remove(&id)?;
        if let Some(index) = self.mailboxes.get_mut(&live.mailbox) {
            index.order.remove(&(rank(live.urgent), id));
            if let Some(ids) = index.by_patient.get_mut(&live.patient_key) {
                ids.remove(&id);
                if ids.is_empty() {
                    index.by_patient.remove(&live.patient_key);
                }
            }
            if index.order.is_empty() {
                self.mailboxes.remove(&live.mailbox);
            }
        }
        Some(live)
    }

    /// The live delivery with this id, to change its slot or attempt.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut Live> {
        self.live.get_mut(&id)
    }

    /// Up to `max` deliveries of `mailbox` that may be leased at `now_ms`, and
    /// those whose expired lease used the last of `max_attempts`.
    pub fn scan(&self, mailbox: &str, now_ms: i64, max: usize, max_attempts: u32) -> Scan {
        let mut scan = Scan::default();
        let Some(index) = self.mailboxes.get(mailbox) else {
            return scan;
        };
        for &(_, id) in &index.order {
            if scan.ready.len() >= max {
                break;
            }
            let Some(live) = self.live.get(&id) else {
                continue;
            };
            let head = index
                .by_patient
                .get(&live.patient_key)
                .and_then(|ids| ids.first());
            if head != Some(&id) {
                continue;
            }
            match live.lease {
                Slot::Queued { not_before_ms } if not_before_ms <= now_ms => scan.ready.push(id),
                Slot::Leased { until_ms } if until_ms <= now_ms => {
                    if live.attempt >= max_attempts {
                        scan.exhausted.push(id);
                    } else {
                        scan.ready.push(id);
                    }
                }
                _ => {}
            }
        }
        scan
    }

    /// Every leased delivery whose lease expired after the last allowed attempt.
    pub fn exhausted(&self, now_ms: i64, max_attempts: u32) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| {
                matches!(l.lease, Slot::Leased { until_ms } if until_ms <= now_ms)
                    && l.attempt >= max_attempts
            })
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Whether no delivery is live.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

fn rank(urgent: bool) -> u8 {
    if urgent { 0 } else { 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(mailbox: &str, patient: &str, urgent: bool) -> Live {
        Live {
            mailbox: mailbox.into(),
            patient_key: patient.into(),
            urgent,
            attempt: 0,
            lease: Slot::Queued { not_before_ms: 0 },
        }
    }

    #[test]
    fn urgent_first_then_fifo_and_one_per_patient() {
        let mut s = Schedule::default();
        s.insert(1, queued("GP1", "p1", false));
        s.insert(2, queued("GP1", "p1", false));
        s.insert(3, queued("GP1", "p2", true));
        s.insert(4, queued("GP1", "p3", false));
        assert_eq!(s.scan("GP1", 0, 10, 5).ready, vec![3, 1, 4]);
        assert_eq!(s.scan("GP1", 0, 2, 5).ready, vec![3, 1]);
        s.get_mut(1).unwrap().lease = Slot::Leased { until_ms: 100 };
        // Patient p1's second delivery waits behind its leased first one.
        assert_eq!(s.scan("GP1", 50, 10, 5).ready, vec![3, 4]);
        assert_eq!(s.scan("GP1", 100, 10, 5).ready, vec![3, 1, 4]);
        s.remove(1);
        assert_eq!(s.scan("GP1", 100, 10, 5).ready, vec![3, 2, 4]);
    }

    #[test]
    fn exhausted_lease_is_reported_not_served() {
        let mut s = Schedule::default();
        s.insert(1, queued("GP1", "p1", false));
        let l = s.get_mut(1).unwrap();
        l.attempt = 3;
        l.lease = Slot::Leased { until_ms: 10 };
        let scan = s.scan("GP1", 10, 10, 3);
        assert_eq!(scan.ready, Vec::<u64>::new());
        assert_eq!(scan.exhausted, vec![1]);
        assert_eq!(s.exhausted(10, 3), vec![1]);
        s.remove(1);
        assert!(s.is_empty());
    }
}
