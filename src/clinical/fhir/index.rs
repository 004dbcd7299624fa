//! The entries of one document Bundle: found by type or by reference, each
//! marked when read, so that whatever is never read (an entry, or an element
//! of one) is listed rather than dropped in silence.

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use serde::Deserialize;

use super::SYS_ODS;
use super::read::{ods_of, parse_with, typed};
use super::tree::Value;
use super::types::{EntryShape, Organization, Reference};
use super::unread;
use crate::clinical::identifiers::OdsCode;
use crate::clinical::violation::ValidationErrors;

/// Where entry `entry` is, for error paths: `entry[3].resource.` under the
/// Bundle's own prefix. Formatted only when an error needs it.
#[derive(Clone, Copy)]
pub(super) struct At<'p> {
    prefix: &'p str,
    entry: usize,
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}entry[{}].resource.", self.prefix, self.entry)
    }
}

/// A resource's type and id, for references written `Type/id`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct TypeAndId<'a> {
    #[serde(default, borrow)]
    pub(super) resource_type: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) id: Option<Cow<'a, str>>,
}

pub(super) struct Index<'a> {
    entries: &'a [EntryShape<'a>],
    kinds: Vec<Option<&'a str>>,
    prefix: &'a str,
    /// Each entry's resource as a tree (read with the whole document): what
    /// the typed reads, the unread walk and the status checks look at.
    trees: Vec<&'a Value<'a>>,
    /// Entries read (or deliberately set aside, with a note).
    used: RefCell<Vec<bool>>,
    /// What was not read, by path.
    notes: RefCell<Vec<String>>,
    /// Modifiers we do not understand: the document is refused.
    refused: RefCell<ValidationErrors>,
}

impl<'a> Index<'a> {
    /// The entries of the Bundle `bundle` (read as `shape`), under `prefix`.
    pub(super) fn new(shape: &'a [EntryShape<'a>], bundle: &'a Value<'a>, prefix: &'a str) -> Self {
        static NONE: Value<'static> = Value::Null;
        // Both lists come from the one tree; should they ever differ, the
        // entries are the ones both hold, never an index past either.
        let n = shape.len();
        let trees: Vec<&'a Value<'a>> = super::tree::resources(bundle)
            .chain(std::iter::repeat(None))
            .take(n)
            .map(|r| r.unwrap_or(&NONE))
            .collect();
        let kinds = trees.iter().map(|r| super::read::kind_of(r)).collect();
        Self {
            used: RefCell::new(vec![false; n]),
            trees,
            entries: shape,
            kinds,
            prefix,
            notes: RefCell::default(),
            refused: RefCell::default(),
        }
    }

    /// Marks entry `i` read, and lists (once) what it holds beyond what the
    /// parser reads.
    pub(super) fn touch(&self, i: usize) {
        let seen = match self.used.borrow_mut().get_mut(i) {
            Some(used) => std::mem::replace(used, true),
            None => return,
        };
        if seen {
            return;
        }
        let kind = self.kind(i).unwrap_or("");
        match unread::schema(kind) {
            Some(schema) => unread::walk_tree(
                self.tree(i),
                schema,
                self.path(i),
                &mut self.notes.borrow_mut(),
                &mut self.refused.borrow_mut(),
            ),
            None => self.note(
                format_args!(
                    "{}entry[{i}].resource ({})",
                    self.prefix,
                    unread::safe_name(kind)
                ),
                "not read: a resource type the gateway does not read here",
            ),
        }
    }

    /// Records that `path` was not read, and why.
    pub(super) fn note(&self, path: impl fmt::Display, why: &str) {
        self.notes.borrow_mut().push(format!("{path}: {why}"));
    }

    /// The entries of type `t`, in order, each marked read as it is taken.
    /// A resource its own status withdraws (entered in error, refuted, not
    /// done) is set aside with a note; one whose status is not a code FHIR
    /// defines for it is refused.
    pub(super) fn of_type(
        &self,
        t: &'static str,
    ) -> impl Iterator<Item = (usize, &'a Value<'a>)> + '_ {
        self.kinds
            .iter()
            .enumerate()
            .filter(move |(_, k)| **k == Some(t))
            .filter_map(move |(i, _)| {
                let resource = self.tree(i);
                match self.standing(t, i) {
                    Err((element, why)) => {
                        self.used.borrow_mut()[i] = true;
                        self.refused
                            .borrow_mut()
                            .add(format!("{}{element}", self.path(i)), why);
                        return None;
                    }
                    Ok(Some(why)) => {
                        self.used.borrow_mut()[i] = true;
                        self.note(
                            format_args!("{}entry[{i}].resource ({t})", self.prefix),
                            &format!("not carried: {why}"),
                        );
                        return None;
                    }
                    Ok(None) => {}
                }
                self.touch(i);
                Some((i, resource))
            })
    }

    /// The Bundle's own prefix in paths.
    pub(super) fn prefix(&self) -> &'a str {
        self.prefix
    }

    pub(super) fn kind(&self, i: usize) -> Option<&'a str> {
        self.kinds.get(i).copied().flatten()
    }

    pub(super) fn path(&self, i: usize) -> At<'a> {
        At {
            prefix: self.prefix,
            entry: i,
        }
    }

    /// The entry a reference points at, by the Bundle rules: an absolute
    /// reference (`urn:uuid:…`, `https://…/Patient/1`) matches a fullUrl;
    /// a relative one (`Patient/1`, with or without `/_history/n`) matches
    /// the one RESTful fullUrl ending in it, or else the one resource of
    /// that type with that id; several (two servers' `Patient/1`) resolve
    /// to none.
    pub(super) fn resolve(&self, r: &Reference) -> Option<(usize, &'a Value<'a>)> {
        let url = r.reference.as_deref()?;
        let i = self.find(url)?;
        self.touch(i);
        Some((i, self.tree(i)))
    }

    /// [`Index::resolve`], refusing at `at` a target whose own status says
    /// it is not current (entered in error, cancelled): a custody episode
    /// or a medicine read from a withdrawn record would be acted on.
    pub(super) fn resolve_current(
        &self,
        r: &Reference,
        at: impl FnOnce() -> String,
        errors: &mut ValidationErrors,
    ) -> Option<(usize, &'a Value<'a>)> {
        let (i, resource) = self.resolve(r)?;
        let kind = self.kind(i)?;
        match self.standing(kind, i) {
            Ok(None) => Some((i, resource)),
            Ok(Some(why)) => {
                errors.add(
                    at(),
                    format!("refers to a {kind} that is not current ({why})"),
                );
                None
            }
            Err((element, why)) => {
                errors.add(format!("{}{element}", self.path(i)), why);
                None
            }
        }
    }

    /// Entry `i`'s resource.
    pub(super) fn tree(&self, i: usize) -> &'a Value<'a> {
        self.trees[i]
    }

    /// What entry `i`'s own status says (see [`unread::standing_of`]).
    fn standing(&self, kind: &str, i: usize) -> Result<Option<String>, (&'static str, String)> {
        unread::standing_of(kind, self.tree(i))
    }

    /// How many entries the Bundle has.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The entry `url` refers to, by the Bundle's rules, without marking it read.
    pub(super) fn position(&self, url: &str) -> Option<usize> {
        self.find(url)
    }

    fn find(&self, url: &str) -> Option<usize> {
        fn full_url<'e>(e: &'e EntryShape<'_>) -> &'e str {
            e.full_url.as_deref().unwrap_or("")
        }
        if let Some(i) = self.entries.iter().rposition(|e| full_url(e) == url) {
            return Some(i);
        }
        let relative = url.split("/_history/").next().unwrap_or(url);
        let (t, id) = relative.split_once('/')?;
        if url.contains(':') || id.contains('/') || t.is_empty() || id.is_empty() {
            return None;
        }
        // A relative reference resolves against the referring entry's base
        // (R4 bundle.html §2.36.4.1). It is read here only when one entry
        // can be meant: two servers' `Patient/1` in one Bundle may be two
        // people, so several matches resolve to none (and are refused).
        let tail = format!("/{t}/{id}");
        let restful: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let f = full_url(&self.entries[i]);
                f.contains("://") && f.split("/_history/").next().unwrap_or(f).ends_with(&tail)
            })
            .collect();
        match restful.as_slice() {
            [i] => return Some(*i),
            [] => {}
            _ => return None,
        }
        let by_id: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                self.kind(i) == Some(t)
                    && TypeAndId::deserialize(self.tree(i))
                        .is_ok_and(|r| r.id.as_deref() == Some(id) && r.resource_type.is_some())
            })
            .collect();
        match by_id.as_slice() {
            [i] => Some(*i),
            _ => None,
        }
    }

    /// The ODS code of the Organization `r` (at `at`) points at: an entry
    /// in the Bundle, or an ODS identifier alone (a logical reference, as
    /// NHS systems often write). None when it names neither.
    pub(super) fn ods(
        &self,
        r: &Reference,
        at: impl fmt::Display,
        errors: &mut ValidationErrors,
    ) -> Option<OdsCode> {
        let by_identifier = |errors: &mut ValidationErrors| {
            let id = r.identifier.as_ref()?;
            if id.system.as_deref() != Some(SYS_ODS) {
                errors.add(
                    format!("{at}.identifier.system"),
                    format!("must be {SYS_ODS}: an organisation is named by its ODS code"),
                );
                return None;
            }
            parse_with(
                id.value.as_deref(),
                format_args!("{at}.identifier.value"),
                errors,
            )
        };
        if r.reference.is_none() {
            return by_identifier(errors);
        }
        let Some((oi, ov)) = self.resolve(r) else {
            // A reference the Bundle does not hold: its ODS identifier, if
            // it gives one; else it is listed, never dropped unsaid.
            if r.identifier.is_some() {
                return by_identifier(errors);
            }
            self.note(
                format_args!("{at}.reference"),
                "not carried: it names no entry in the Bundle and gives no ODS identifier",
            );
            return None;
        };
        if self.kind(oi) != Some("Organization") {
            errors.add(
                format!("{}resourceType", self.path(oi)),
                "must be an Organization: it is referred to as one",
            );
            return None;
        }
        let o: Organization = typed(ov, self.path(oi), errors)?;
        parse_with(
            ods_of(&o),
            format_args!("{}identifier[0].value", self.path(oi)),
            errors,
        )
    }

    /// Lists every entry never read, moves the refusals into `errors`, and
    /// returns the notes: what the document held that was not read.
    pub(super) fn finish(self, errors: &mut ValidationErrors) -> Vec<String> {
        let mut notes = self.notes.into_inner();
        for (i, used) in self.used.into_inner().into_iter().enumerate() {
            if used {
                continue;
            }
            let kind = unread::safe_name(self.kinds[i].unwrap_or(""));
            let why = if unread::schema(kind).is_some() {
                "not read: beyond the one of its type the gateway reads, and referred to by \
                 nothing it reads"
            } else {
                "not read: a resource type the gateway does not read"
            };
            notes.push(format!(
                "{}entry[{i}].resource ({kind}): {why}",
                self.prefix
            ));
        }
        errors.0.extend(self.refused.into_inner().0);
        notes
    }
}
