//! A node's turn at a round of work that must not run on two nodes at once
//! (the MESH edge's rounds, the PDS lookups'): a session-level advisory lock
//! on a connection taken out of the pool for the round. Dropping the turn
//! closes that connection, which releases the lock; so does a node that
//! dies mid-round. The lock never goes back into the pool with a
//! connection.

use super::PgStore;
use super::sql::db;
use crate::store::StoreError;

/// This node's turn; the lock goes with the connection when dropped.
pub struct Turn {
    _held: deadpool_postgres::ClientWrapper,
}

impl PgStore {
    /// The turn for advisory-lock key `lock`, or `None` while another
    /// node's round holds it.
    pub(super) async fn turn(&self, lock: i64) -> Result<Option<Turn>, StoreError> {
        self.run(move |s| async move {
            let client = s.client().await?;
            let row = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&lock])
                .await
                .map_err(db)?;
            if !row.get::<_, bool>(0) {
                return Ok(None);
            }
            Ok(Some(Turn {
                _held: deadpool_postgres::Object::take(client),
            }))
        })
        .await
    }
}
