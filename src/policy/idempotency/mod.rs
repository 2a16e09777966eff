//! `Idempotency-Key` end to end (IETF draft "The Idempotency-Key HTTP Header Field").
//!
//! Why in the mesh? Retrying a POST is only safe when the receiver recognises the retry. The outbound
//! sidecar gives every POST/PATCH a key ([`InjectKey`]), which makes it retryable; the inbound sidecar
//! remembers keys and their responses ([`Dedup`]) so that a retry — even one that lands on another replica,
//! through [`RedisStore`] — gets the first response instead of charging a payment twice.

pub mod dedup;
pub mod error;
pub mod inject;
mod layer;
pub mod memory;
pub mod redis;
pub mod store;

pub use dedup::{Dedup, FirstRequests};
pub use error::StoreError;
pub use inject::InjectKey;
pub use layer::{DedupLayer, InjectKeyLayer};
pub use memory::MemoryStore;
pub use redis::{RedisLimits, RedisStore};
pub use store::{DedupStore, StoredResponse};

/// The request header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// [`IDEMPOTENCY_KEY`] as a header name, for the lookups every request makes.
pub(crate) const KEY_HEADER: http::HeaderName = http::HeaderName::from_static(IDEMPOTENCY_KEY);

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// The key inside an `Idempotency-Key` value: an RFC 8941 sf-string (`"..."`, with `\"` and `\\` escapes).
/// A bare token is accepted too, as some clients send one. `None` when malformed, empty or too long.
pub fn parse_key(value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let key = match text.strip_prefix('"') {
        Some(quoted) => {
            let inner = quoted.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next()? {
                        c @ ('"' | '\\') => out.push(c),
                        _ => return None,
                    },
                    '"' => return None,
                    c if (' '..='~').contains(&c) => out.push(c),
                    _ => return None,
                }
            }
            out
        }
        None if text.bytes().all(|b| b.is_ascii_graphic() && b != b'"') => text.to_string(),
        None => return None,
    };
    (!key.is_empty() && key.len() <= MAX_KEY_BYTES).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_sf_strings() {
        assert_eq!(parse_key(b"\"abc-1\"").as_deref(), Some("abc-1"));
        assert_eq!(parse_key(br#""a\"b""#).as_deref(), Some("a\"b"));
        assert_eq!(parse_key(b"token-ok").as_deref(), Some("token-ok"));
        assert_eq!(parse_key(b"\"unterminated"), None);
        assert_eq!(parse_key(b"\"\""), None);
        assert_eq!(
            parse_key(format!("\"{}\"", "x".repeat(300)).as_bytes()),
            None
        );
        let fresh = inject::fresh_key();
        let key = parse_key(fresh.as_bytes()).unwrap();
        assert_eq!(uuid::Uuid::parse_str(&key).unwrap().get_version_num(), 7);
    }
}
