//! A store shared by the replicas of a service through Redis, so that a retry landing on another replica
//! (even after the first replica died) is still de-duplicated.
//!
//! The claim is atomic: `SET key value NX PX ttl`. A value is the owner's token (32 hex digits), a JSON head
//! (state, fingerprint, status, headers) and the raw body. Completing overwrites the value and releasing
//! deletes it, each only while it still starts with the owner's token (two small Lua scripts).
//! Waiters poll every [`POLL_INTERVAL`].
//!
//! Bounds: Redis is shared, so the sidecar bounds what it writes itself ([`RedisLimits`]): no value larger
//! than `max_value_bytes` (a larger response is not stored and its key is released, like a response over
//! the policy's `max_body_bytes`), and no TTL longer than `max_ttl`, whatever the policy asks. The number of
//! keys and their total size are bounded by the TTL and Redis's own `maxmemory` (give the instance one, with
//! `volatile-ttl` or `volatile-lru`: every key this store writes has a TTL).

use std::time::Duration;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::error::StoreError;
use super::store::{
    Claim, ClaimToken, DedupStore, Entry, Fingerprint, StoreFuture, StoredResponse,
};

/// How often a waiting duplicate looks at the key again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Prefix of every key this store writes.
const PREFIX: &str = "meshlet:idem:";
const TOKEN_LEN: usize = 32;

const RELEASE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Completes: overwrites the value (with a fresh TTL) only while it still starts with the owner's token, so
/// that a late owner whose claim expired never overwrites the entry of whoever claimed the key next.
const COMPLETE_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0";

#[derive(Serialize, Deserialize)]
struct Head {
    done: bool,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response: Option<StoredResponse>,
}

/// What this store writes to Redis at most, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisLimits {
    /// Largest value (owner token, head with the response's headers, body) written for one key.
    pub max_value_bytes: usize,
    /// Longest TTL given to a key.
    pub max_ttl: Duration,
}

impl Default for RedisLimits {
    /// 2 MiB (the policy's default `max_body_bytes` of 1 MiB plus room for headers) and 24 hours.
    fn default() -> Self {
        RedisLimits {
            max_value_bytes: 2 << 20,
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// De-duplication state in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: MultiplexedConnection,
    addr: String,
    release: std::sync::Arc<redis::Script>,
    complete: std::sync::Arc<redis::Script>,
    limits: RedisLimits,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), with the default [`RedisLimits`].
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let err = |source| StoreError::Redis {
            addr: url.to_string(),
            source,
        };
        let client = redis::Client::open(url).map_err(err)?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(err)?;
        Ok(RedisStore {
            conn,
            addr: url.to_string(),
            release: std::sync::Arc::new(redis::Script::new(RELEASE_SCRIPT)),
            complete: std::sync::Arc::new(redis::Script::new(COMPLETE_SCRIPT)),
            limits: RedisLimits::default(),
        })
    }

    /// The same store, writing within `limits`.
    pub fn with_limits(mut self, limits: RedisLimits) -> RedisStore {
        self.limits = limits;
        self
    }

    /// The TTL written for a policy's `ttl`: at least a millisecond, at most `max_ttl`.
    fn ttl_ms(&self, ttl: Duration) -> u64 {
        let ms = ttl.min(self.limits.max_ttl).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    async fn delete_if_owned(&self, key: &str, token: &ClaimToken) -> Result<(), StoreError> {
        let _: i64 = self
            .release
            .key(key)
            .arg(&token.0)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis {
            addr: self.addr.clone(),
            source,
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.err(e))?;
        value.map(|v| decode(key, &v)).transpose()
    }
}

fn encode(token: &ClaimToken, entry: &Entry) -> Vec<u8> {
    let (done, fingerprint, response) = match entry {
        Entry::InFlight { fingerprint } => (false, fingerprint, None),
        Entry::Done {
            fingerprint,
            response,
        } => (true, fingerprint, Some(response.clone())),
    };
    let body = response
        .as_ref()
        .map(|r| r.body.clone())
        .unwrap_or_default();
    let head = Head {
        done,
        fingerprint: hex(fingerprint),
        response,
    };
    let head = serde_json::to_vec(&head).unwrap_or_default();
    let mut out = Vec::with_capacity(TOKEN_LEN + 4 + head.len() + body.len());
    out.extend_from_slice(token.0.as_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    out
}

fn decode(key: &str, value: &[u8]) -> Result<Entry, StoreError> {
    let malformed = |reason: &str| StoreError::Malformed {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    let rest = value
        .get(TOKEN_LEN..)
        .ok_or_else(|| malformed("shorter than a token"))?;
    let len_bytes: [u8; 4] = rest
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| malformed("no head"))?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    let head = rest
        .get(4..4 + len)
        .ok_or_else(|| malformed("head cut short"))?;
    let body = &rest[4 + len..];
    let head: Head = serde_json::from_slice(head).map_err(|e| malformed(&e.to_string()))?;
    let fingerprint = unhex(&head.fingerprint).ok_or_else(|| malformed("bad fingerprint"))?;
    Ok(match (head.done, head.response) {
        (true, Some(mut response)) => {
            response.body = Bytes::copy_from_slice(body);
            Entry::Done {
                fingerprint,
                response,
            }
        }
        _ => Entry::InFlight { fingerprint },
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Fingerprint> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
    }
    Some(out)
}

impl DedupStore for RedisStore {
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        ttl: Duration,
    ) -> StoreFuture<'a, Claim> {
        Box::pin(async move {
            let key = format!("{PREFIX}{key}");
            let token = ClaimToken::new();
            let value = encode(&token, &Entry::InFlight { fingerprint });
            for _ in 0..3 {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.ttl_ms(ttl))
                    .query_async(&mut self.conn.clone())
                    .await
                    .map_err(|e| self.err(e))?;
                if set.is_some() {
                    return Ok(Claim::Won(token));
                }
                // Taken, unless it expired between the SET and this GET: then try again.
                if let Some(entry) = self.get(&key).await? {
                    return Ok(Claim::Taken(entry));
                }
            }
            Err(StoreError::Malformed {
                key,
                reason: "claimed and expired repeatedly".into(),
            })
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a ClaimToken,
        fingerprint: Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = format!("{PREFIX}{key}");
            let value = encode(
                token,
                &Entry::Done {
                    fingerprint,
                    response,
                },
            );
            if value.len() > self.limits.max_value_bytes {
                self.delete_if_owned(&key, token).await?;
                return Err(StoreError::TooLarge {
                    key,
                    bytes: value.len(),
                    max: self.limits.max_value_bytes,
                });
            }
            let _: i64 = self
                .complete
                .key(&key)
                .arg(&token.0)
                .arg(value)
                .arg(self.ttl_ms(ttl))
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a ClaimToken) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.delete_if_owned(&format!("{PREFIX}{key}"), token).await })
    }

    fn wait<'a>(&'a self, key: &'a str, until: Instant) -> StoreFuture<'a, Option<Entry>> {
        Box::pin(async move {
            let key = format!("{PREFIX}{key}");
            loop {
                let entry = self.get(&key).await?;
                if !matches!(entry, Some(Entry::InFlight { .. }))
                    || Instant::now() + POLL_INTERVAL > until
                {
                    return Ok(entry);
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let token = ClaimToken::new();
        assert_eq!(token.0.len(), TOKEN_LEN);
        let response = StoredResponse {
            status: 201,
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: Bytes::from_static(b"\x00binary\xff"),
        };
        for entry in [
            Entry::InFlight {
                fingerprint: [7; 32],
            },
            Entry::Done {
                fingerprint: [9; 32],
                response,
            },
        ] {
            assert_eq!(decode("k", &encode(&token, &entry)).unwrap(), entry);
        }
        assert!(decode("k", b"short").is_err());
    }
}
