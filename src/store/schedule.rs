//! Which live delivery goes next: the writer's in-memory index over the
//! `pending` tree, rebuilt from it at start-up.
//!
//! Order inside a mailbox: urgent before routine, then FIFO by delivery id.
//! Per-patient order: only a patient's oldest live delivery in a mailbox can be
//! leased, so a patient's handovers arrive in the order they were sent. A
//! quarantined delivery leaves the index, so it never blocks anyone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// A fast hasher: every key here is ours (delivery ids, mailbox names,
/// keyed patient hashes), none chosen by a caller, so no flooding to resist.
type Fast = foldhash::fast::RandomState;

/// A patient's live deliveries in one mailbox: nearly always one, held
/// inline (no allocation per patient).
type Ids = smallvec::SmallVec<[u64; 1]>;

/// Scheduling facts about one live delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Receiving mailbox (shared with the index: one allocation per mailbox).
    pub mailbox: Arc<str>,
    /// Keyed hash of the patient (shared with the index: one per patient).
    pub patient_key: Arc<str>,
    /// Served first.
    pub urgent: bool,
    /// Attempts so far.
    pub attempt: u32,
    /// Queued (with a not-before time) or leased (until a time).
    pub lease: Slot,
    /// When queued, ms.
    pub queued_at_ms: i64,
    /// Deadline, ms.
    pub due_ms: Option<i64>,
    /// Whether its missed deadline has been reported.
    pub due_reported: bool,
    /// Attempts allowed, when an operator redrive raised the default.
    pub max_attempts: Option<u32>,
    /// Leased when a newer summary superseded it: never offered again.
    pub stale: bool,
}

/// Counts of one mailbox's live deliveries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailboxCounts {
    /// Live deliveries (queued, leased or parked).
    pub depth: u64,
    /// Out on lease.
    pub leased: u64,
    /// Urgent ones.
    pub urgent: u64,
    /// Past their deadline (reported or not).
    pub overdue: u64,
    /// When the oldest live one was queued, ms.
    pub oldest_queued_at_ms: Option<i64>,
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
    /// Each patient's live deliveries, ascending; the first is the only one
    /// leasable. Most patients have one, so a sorted vector, not a set.
    by_patient: HashMap<Arc<str>, Ids, Fast>,
}

/// The index of every live delivery.
#[derive(Debug, Default)]
pub struct Schedule {
    live: HashMap<u64, Live, Fast>,
    mailboxes: HashMap<Arc<str>, MailboxIndex, Fast>,
    /// (lease expiry, delivery id) of every leased delivery.
    leases: BTreeSet<(i64, u64)>,
    /// (deadline, delivery id) of live deliveries whose miss is not yet reported.
    deadlines: BTreeSet<(i64, u64)>,
}

impl Schedule {
    /// Adds a live delivery.
    pub fn insert(&mut self, id: u64, mut live: Live) {
        // Share the index's copies of the mailbox and patient key.
        if let Some((name, _)) = self.mailboxes.get_key_value(&*live.mailbox) {
            live.mailbox = name.clone();
        }
        let index = self.mailboxes.entry(live.mailbox.clone()).or_default();
        index.order.insert((rank(live.urgent), id));
        if let Some((key, _)) = index.by_patient.get_key_value(&*live.patient_key) {
            live.patient_key = key.clone();
        }
        let ids = index
            .by_patient
            .entry(live.patient_key.clone())
            .or_default();
        if let Err(at) = ids.binary_search(&id) {
            ids.insert(at, id);
        }
        if let Slot::Leased { until_ms } = live.lease {
            self.leases.insert((until_ms, id));
        }
        if let Some(due) = live.due_ms.filter(|_| !live.due_reported) {
            self.deadlines.insert((due, id));
        }
        self.live.insert(id, live);
    }

    /// The index of `rows` at once, for start-up: the ordered sets are
    /// bulk-built from sorted runs, which is several times faster than
    /// inserting 200,000 deliveries one by one. The same index as inserting
    /// each row.
    pub fn from_rows(mut rows: Vec<(u64, Live)>) -> Self {
        rows.sort_unstable_by_key(|(id, _)| *id);
        let mut s = Schedule::default();
        s.live.reserve(rows.len());
        let mut orders: HashMap<Arc<str>, Vec<(u8, u64)>, Fast> = HashMap::default();
        let (mut leases, mut deadlines) = (Vec::new(), Vec::new());
        for (id, mut live) in rows {
            if let Some((name, _)) = s.mailboxes.get_key_value(&*live.mailbox) {
                live.mailbox = name.clone();
            }
            let index = s.mailboxes.entry(live.mailbox.clone()).or_default();
            if let Some((key, _)) = index.by_patient.get_key_value(&*live.patient_key) {
                live.patient_key = key.clone();
            }
            // Ascending ids: each patient's list stays sorted.
            index
                .by_patient
                .entry(live.patient_key.clone())
                .or_default()
                .push(id);
            orders
                .entry(live.mailbox.clone())
                .or_default()
                .push((rank(live.urgent), id));
            if let Slot::Leased { until_ms } = live.lease {
                leases.push((until_ms, id));
            }
            if let Some(due) = live.due_ms.filter(|_| !live.due_reported) {
                deadlines.push((due, id));
            }
            s.live.insert(id, live);
        }
        for (mailbox, order) in orders {
            if let Some(index) = s.mailboxes.get_mut(&mailbox) {
                index.order = order.into_iter().collect();
            }
        }
        s.leases = leases.into_iter().collect();
        s.deadlines = deadlines.into_iter().collect();
        s
    }

    /// Removes a delivery that was acknowledged or quarantined.
    pub fn remove(&mut self, id: u64) -> Option<Live> {
        let live = self.live.remove(&id)?;
        if let Slot::Leased { until_ms } = live.lease {
            self.leases.remove(&(until_ms, id));
        }
        if let Some(due) = live.due_ms.filter(|_| !live.due_reported) {
            self.deadlines.remove(&(due, id));
        }
        if let Some(index) = self.mailboxes.get_mut(&live.mailbox) {
            index.order.remove(&(rank(live.urgent), id));
            if let Some(ids) = index.by_patient.get_mut(&live.patient_key) {
                if let Ok(at) = ids.binary_search(&id) {
                    ids.remove(at);
                }
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

    /// Records that a delivery was leased (attempt `attempt`) until `until_ms`.
    pub fn lease(&mut self, id: u64, attempt: u32, until_ms: i64) {
        self.set_slot(id, Slot::Leased { until_ms });
        if let Some(live) = self.live.get_mut(&id) {
            live.attempt = attempt;
        }
    }

    /// Records that a delivery is queued again, leasable from `not_before_ms`.
    pub fn requeue(&mut self, id: u64, not_before_ms: i64) {
        self.set_slot(id, Slot::Queued { not_before_ms });
    }

    fn set_slot(&mut self, id: u64, slot: Slot) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        if let Slot::Leased { until_ms } = live.lease {
            self.leases.remove(&(until_ms, id));
        }
        if let Slot::Leased { until_ms } = slot {
            self.leases.insert((until_ms, id));
        }
        live.lease = slot;
    }

    /// Up to `max` deliveries of `mailbox` that may be leased at `now_ms`, in
    /// serving order. An expired lease on its last allowed attempt is not
    /// offered again (see [`Schedule::exhausted`]).
    pub fn ready(&self, mailbox: &str, now_ms: i64, max: usize, max_attempts: u32) -> Vec<u64> {
        let mut ready = Vec::new();
        let Some(index) = self.mailboxes.get(mailbox) else {
            return ready;
        };
        for &(_, id) in &index.order {
            if ready.len() >= max {
                break;
            }
            let Some(live) = self.live.get(&id).filter(|l| !l.stale) else {
                continue;
            };
            let head = index
                .by_patient
                .get(&live.patient_key)
                .and_then(|ids| ids.first());
            if head != Some(&id) {
                continue;
            }
            let max_attempts = live.max_attempts.unwrap_or(max_attempts);
            let leasable = match live.lease {
                Slot::Queued { not_before_ms } => not_before_ms <= now_ms,
                Slot::Leased { until_ms } => until_ms <= now_ms && live.attempt < max_attempts,
            };
            if leasable {
                ready.push(id);
            }
        }
        ready
    }

    /// Leased deliveries (of `mailbox`, or of all) whose lease expired on the
    /// last allowed attempt, by delivery id.
    pub fn exhausted(&self, now_ms: i64, max_attempts: u32, mailbox: Option<&str>) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .leases
            .range(..=(now_ms, u64::MAX))
            .filter_map(|(_, id)| self.live.get(id).map(|l| (*id, l)))
            .filter(|(_, l)| {
                !l.stale
                    && l.attempt >= l.max_attempts.unwrap_or(max_attempts)
                    && mailbox.is_none_or(|m| m == &*l.mailbox)
            })
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Marks a leased delivery as superseded while out on lease.
    pub fn mark_stale(&mut self, id: u64) {
        if let Some(live) = self.live.get_mut(&id) {
            live.stale = true;
        }
    }

    /// Stale deliveries (of `mailbox`, or of all) whose lease has expired, by id.
    pub fn expired_stale(&self, now_ms: i64, mailbox: Option<&str>) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .leases
            .range(..=(now_ms, u64::MAX))
            .filter(|(_, id)| {
                self.live
                    .get(id)
                    .is_some_and(|l| l.stale && mailbox.is_none_or(|m| m == &*l.mailbox))
            })
            .map(|(_, id)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Up to `max` live deliveries whose deadline passed by `now_ms` and was
    /// not yet reported, earliest deadline first; they are then taken as reported.
    pub fn take_overdue(&mut self, now_ms: i64, max: usize) -> Vec<u64> {
        let ids: Vec<u64> = self
            .deadlines
            .range(..=(now_ms, u64::MAX))
            .take(max)
            .map(|(_, id)| *id)
            .collect();
        for id in &ids {
            if let Some(live) = self.live.get_mut(id)
                && let Some(due) = live.due_ms.filter(|_| !live.due_reported)
            {
                live.due_reported = true;
                self.deadlines.remove(&(due, *id));
            }
        }
        ids
    }

    /// The live deliveries of `patient_key` in `mailbox`, oldest first.
    pub fn of_patient(&self, mailbox: &str, patient_key: &str) -> Vec<u64> {
        self.mailboxes
            .get(mailbox)
            .and_then(|m| m.by_patient.get(patient_key))
            .map(|ids| ids.to_vec())
            .unwrap_or_default()
    }

    /// The live deliveries of `patient_key` in every mailbox.
    pub fn of_patient_anywhere(&self, patient_key: &str) -> BTreeSet<u64> {
        self.mailboxes
            .values()
            .filter_map(|m| m.by_patient.get(patient_key))
            .flatten()
            .copied()
            .collect()
    }

    /// Every live delivery of `mailbox`, in serving order.
    pub fn of_mailbox(&self, mailbox: &str) -> Vec<u64> {
        self.mailboxes
            .get(mailbox)
            .map(|m| m.order.iter().map(|(_, id)| *id).collect())
            .unwrap_or_default()
    }

    /// Counts per mailbox at `now_ms`.
    pub fn counts(&self, now_ms: i64) -> HashMap<String, MailboxCounts> {
        let mut out: HashMap<String, MailboxCounts> = HashMap::new();
        for live in self.live.values() {
            // Look up before inserting: no allocation per live delivery.
            if !out.contains_key(&*live.mailbox) {
                out.insert(live.mailbox.to_string(), MailboxCounts::default());
            }
            let Some(c) = out.get_mut(&*live.mailbox) else {
                continue;
            };
            c.depth += 1;
            c.leased +=
                u64::from(matches!(live.lease, Slot::Leased { until_ms } if until_ms > now_ms));
            c.urgent += u64::from(live.urgent);
            c.overdue += u64::from(live.due_ms.is_some_and(|due| due <= now_ms));
            c.oldest_queued_at_ms = Some(
                c.oldest_queued_at_ms
                    .map_or(live.queued_at_ms, |t| t.min(live.queued_at_ms)),
            );
        }
        out
    }

    /// Every live delivery, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Live)> {
        self.live.iter().map(|(id, live)| (*id, live))
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
            queued_at_ms: 0,
            due_ms: None,
            due_reported: false,
            max_attempts: None,
            stale: false,
        }
    }

    /// Built at once or one by one, the same index.
    #[test]
    fn rows_at_once_index_as_inserted_one_by_one() {
        let mut rows = Vec::new();
        for id in (1..=40u64).rev() {
            let mut live = queued(
                ["GP1", "GP2", "PR1"][(id % 3) as usize],
                &format!("p{}", id % 7),
                id % 5 == 0,
            );
            if id % 4 == 0 {
                live.lease = Slot::Leased {
                    until_ms: 100 + i64::try_from(id).unwrap(),
                };
            }
            live.due_ms = (id % 2 == 0).then_some(50);
            live.due_reported = id % 6 == 0;
            rows.push((id, live));
        }
        let mut one_by_one = Schedule::default();
        for (id, live) in rows.clone() {
            one_by_one.insert(id, live);
        }
        let at_once = Schedule::from_rows(rows);
        assert_eq!(at_once.live, one_by_one.live);
        assert_eq!(at_once.leases, one_by_one.leases);
        assert_eq!(at_once.deadlines, one_by_one.deadlines);
        assert_eq!(at_once.mailboxes.len(), 3);
        for (name, index) in &one_by_one.mailboxes {
            let other = &at_once.mailboxes[name];
            assert_eq!(other.order, index.order, "{name}");
            assert_eq!(other.by_patient, index.by_patient, "{name}");
        }
        for m in ["GP1", "GP2", "PR1"] {
            assert_eq!(
                at_once.ready(m, 120, 100, 5),
                one_by_one.ready(m, 120, 100, 5)
            );
        }
    }

    #[test]
    fn overdue_deliveries_are_reported_once() {
        let mut s = Schedule::default();
        let mut a = queued("GP1", "p1", false);
        a.due_ms = Some(100);
        s.insert(1, a);
        let mut b = queued("GP1", "p2", false);
        b.due_ms = Some(200);
        s.insert(2, b);
        assert!(s.take_overdue(99, 10).is_empty());
        assert_eq!(s.counts(150)["GP1"].overdue, 1);
        assert_eq!(s.take_overdue(150, 10), vec![1]);
        assert!(s.take_overdue(150, 10).is_empty(), "reported once");
        assert_eq!(s.counts(150)["GP1"].overdue, 1, "still overdue");
        s.remove(2);
        assert!(s.take_overdue(1_000, 10).is_empty());
        s.remove(1);
        assert!(s.counts(1_000).is_empty());
    }

    #[test]
    fn urgent_first_then_fifo_and_one_per_patient() {
        let mut s = Schedule::default();
        s.insert(1, queued("GP1", "p1", false));
        s.insert(2, queued("GP1", "p1", false));
        s.insert(3, queued("GP1", "p2", true));
        s.insert(4, queued("GP1", "p3", false));
        assert_eq!(s.ready("GP1", 0, 10, 5), vec![3, 1, 4]);
        assert_eq!(s.ready("GP1", 0, 2, 5), vec![3, 1]);
        s.lease(1, 1, 100);
        // Patient p1's second delivery waits behind its leased first one.
        assert_eq!(s.ready("GP1", 50, 10, 5), vec![3, 4]);
        assert_eq!(s.ready("GP1", 100, 10, 5), vec![3, 1, 4]);
        s.remove(1);
        assert_eq!(s.ready("GP1", 100, 10, 5), vec![3, 2, 4]);
        assert!(s.ready("GP2", 100, 10, 5).is_empty());
    }

    #[test]
    fn exhausted_lease_is_reported_not_served() {
        let mut s = Schedule::default();
        s.insert(1, queued("GP1", "p1", false));
        s.insert(2, queued("GP2", "p1", false));
        s.lease(1, 3, 10);
        s.lease(2, 3, 20);
        assert!(s.ready("GP1", 10, 10, 3).is_empty());
        assert_eq!(s.exhausted(9, 3, None), Vec::<u64>::new());
        assert_eq!(s.exhausted(10, 3, None), vec![1]);
        assert_eq!(s.exhausted(20, 3, None), vec![1, 2]);
        assert_eq!(s.exhausted(20, 3, Some("GP2")), vec![2]);
        assert_eq!(s.exhausted(20, 4, None), Vec::<u64>::new());
        s.requeue(1, 0);
        assert_eq!(s.exhausted(20, 3, None), vec![2]);
        s.remove(1);
        s.remove(2);
        assert!(s.is_empty());
        assert!(s.leases.is_empty());
    }

    #[test]
    fn a_stale_lease_blocks_its_patient_until_retired_and_is_never_offered() {
        let mut s = Schedule::default();
        s.insert(1, queued("GP1", "p1", false));
        s.insert(2, queued("GP1", "p1", false));
        s.insert(3, queued("GP2", "p1", false));
        s.lease(1, 1, 10);
        s.mark_stale(1);
        assert_eq!(s.of_patient_anywhere("p1"), BTreeSet::from([1, 2, 3]));
        assert!(s.ready("GP1", 5, 10, 5).is_empty(), "behind the leased one");
        assert!(s.ready("GP1", 10, 10, 5).is_empty(), "expired but stale");
        assert!(s.expired_stale(9, None).is_empty());
        assert_eq!(s.expired_stale(10, Some("GP1")), vec![1]);
        assert!(s.expired_stale(10, Some("GP2")).is_empty());
        assert!(
            s.exhausted(10, 1, None).is_empty(),
            "retired, not quarantined"
        );
        s.remove(1);
        assert_eq!(s.ready("GP1", 10, 10, 5), vec![2]);
    }
}
