/// A de-duplication store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused or could not be reached.
    #[error("redis at {addr}: {source}")]
    Redis {
        /// The server.
        addr: String,
        /// What went wrong.
        #[source]
        source: redis::RedisError,
    },
    /// A stored value could not be decoded.
    #[error("stored entry for key {key} is malformed: {reason}")]
    Malformed {
        /// The store key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A response too large for the store's bound on one entry; it was not stored and its key was released.
    #[error("response for key {key} takes {bytes} bytes, more than the store's {max}")]
    TooLarge {
        /// The store key.
        key: String,
        /// Its encoded size.
        bytes: usize,
        /// The bound.
        max: usize,
    },
}
