//! Pages of the operator listings: a page size and an opaque token that
//! carries the cursor of the last row given (a store key or a sort key), so
//! a page starts right after it in a stable order, whatever was added or
//! removed in between.
//!
//! A token is the listing's tag and the cursor, base64url-encoded: opaque to
//! callers (they only hand it back), and refused with a field violation on
//! another listing, so a token cannot be replayed against the wrong call.

use super::Error;

/// Most rows one page holds, and the size of a page when none is asked.
pub const MAX_PAGE: usize = 1_000;

/// Which listing a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `ListMailboxes`, by mailbox name.
    Mailboxes = 1,
    /// `ListQuarantine`, by quarantine index key.
    Quarantine = 2,
    /// `ListParked`, by pending index key.
    Parked = 3,
    /// `ListOrganisations`, by ODS code.
    Organisations = 4,
    /// `ListIdentityConflicts`, newest first, by conflict key.
    Conflicts = 5,
    /// `AuditTrail`, by audit sequence number.
    Audit = 6,
}

/// A page as asked: its size (0: [`MAX_PAGE`]) and the token of the page
/// before (empty: the first page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Rows wanted; 0 means the most.
    pub size: i32,
    /// The previous page's `next_token`, or empty.
    pub token: String,
}

/// One page of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The rows.
    pub items: Vec<T>,
    /// The token of the next page; empty when this is the last.
    pub next_token: String,
}

impl PageRequest {
    /// The first page of at most `size` rows.
    #[must_use]
    pub fn first(size: i32) -> Self {
        Self {
            size,
            token: String::new(),
        }
    }

    /// The page size and the cursor to start after.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `page_size` or `page_token`.
    pub(crate) fn read(&self, listing: Listing) -> Result<(usize, Option<Vec<u8>>), Error> {
        let size = match usize::try_from(self.size) {
            Err(_) => return Err(Error::invalid("page_size", "must not be negative")),
            Ok(0) => MAX_PAGE,
            Ok(n) => n.min(MAX_PAGE),
        };
        if self.token.is_empty() {
            return Ok((size, None));
        }
        let refused = || {
            Error::invalid(
                "page_token",
                "not a token this call gave: pass next_page_token from the previous page unchanged",
            )
        };
        let bytes = data_encoding::BASE64URL_NOPAD
            .decode(self.token.as_bytes())
            .map_err(|_| refused())?;
        match bytes.split_first() {
            Some((tag, cursor)) if *tag == listing as u8 && !cursor.is_empty() => {
                Ok((size, Some(cursor.to_vec())))
            }
            _ => Err(refused()),
        }
    }
}

/// The token that resumes `listing` after `cursor`.
#[must_use]
pub(crate) fn token(listing: Listing, cursor: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(1 + cursor.len());
    bytes.push(listing as u8);
    bytes.extend_from_slice(cursor);
    data_encoding::BASE64URL_NOPAD.encode(&bytes)
}

/// A page of `rows` (each with its cursor) fetched one beyond `size`: the
/// extra row only says there is a next page.
pub(crate) fn page_of<T>(listing: Listing, mut rows: Vec<(Vec<u8>, T)>, size: usize) -> Page<T> {
    let more = rows.len() > size;
    rows.truncate(size);
    let next_token = match rows.last() {
        Some((cursor, _)) if more => token(listing, cursor),
        _ => String::new(),
    };
    Page {
        items: rows.into_iter().map(|(_, row)| row).collect(),
        next_token,
    }
}

/// A page of an already ordered listing, keyed by `key` (strictly
/// increasing along `rows`), starting after `after`.
pub(crate) fn page_sorted<T>(
    listing: Listing,
    rows: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> Vec<u8>,
    after: Option<&[u8]>,
    size: usize,
) -> Page<T> {
    let rows: Vec<(Vec<u8>, T)> = rows
        .into_iter()
        .map(|r| (key(&r), r))
        .filter(|(k, _)| after.is_none_or(|a| k.as_slice() > a))
        .take(size.saturating_add(1))
        .collect();
    page_of(listing, rows, size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_resume_after_their_cursor_and_only_on_their_listing() {
        let rows = (1u8..=5).map(|i| vec![i]);
        let first = page_sorted(Listing::Audit, rows.clone(), Clone::clone, None, 2);
        assert_eq!(first.items, [vec![1], vec![2]]);
        let request = PageRequest {
            size: 2,
            token: first.next_token.clone(),
        };
        let (size, after) = request.read(Listing::Audit).unwrap();
        let second = page_sorted(
            Listing::Audit,
            rows.clone(),
            Clone::clone,
            after.as_deref(),
            size,
        );
        assert_eq!(second.items, [vec![3], vec![4]]);
        let (_, after) = PageRequest {
            size: 2,
            token: second.next_token,
        }
        .read(Listing::Audit)
        .unwrap();
        let last = page_sorted(Listing::Audit, rows, Clone::clone, after.as_deref(), 2);
        assert_eq!(last.items, [vec![5]]);
        assert!(last.next_token.is_empty());
        assert!(request.read(Listing::Parked).is_err());
        assert!(
            PageRequest {
                size: 0,
                token: "zz".into()
            }
            .read(Listing::Audit)
            .is_err()
        );
        assert!(PageRequest::first(-1).read(Listing::Audit).is_err());
        assert_eq!(
            PageRequest::first(0).read(Listing::Audit).unwrap().0,
            MAX_PAGE
        );
    }
}
