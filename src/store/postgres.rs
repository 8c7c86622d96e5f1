//! The PostgreSQL backend (being written).
use super::{StoreError, StoreResult};

pub struct PgStore {}

impl PgStore {
    pub async fn open(_url: &str, _pool_size: usize) -> StoreResult<PgStore> {
        Err(StoreError::Unavailable(
            "postgres backend not yet implemented".into(),
        ))
    }
}
