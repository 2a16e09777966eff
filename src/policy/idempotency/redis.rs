//! A store shared by the replicas of a service through Redis, so that a retry landing on another replica
//! (even after the first replica died) is still de-duplicated.
//!
//! The claim is atomic: `SET key value NX PX ttl`. A value is the owner's token (32 hex digits), a JSON head
//! (state, fingerprint, status, headers) and the raw body. Completing overwrites the value (`SET … XX PX
//! ttl`); releasing deletes it only while it still starts with the owner's token (a small Lua script).
//! Waiters poll every [`POLL_INTERVAL`]. Memory is bounded by the TTL and by Redis's own `maxmemory` policy.

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

#[derive(Serialize, Deserialize)]
struct Head {
    done: bool,
    fingerprint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response: Option<StoredResponse>,
}

/// De-duplication state in Redis.
#[derive(Clone)]
pub struct RedisStore {
    conn: MultiplexedConnection,
    addr: String,
    release: std::sync::Arc<redis::Script>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`).
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
        })
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

fn ttl_ms(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64).max(1)
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
                    .arg(ttl_ms(ttl))
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
            let _: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("XX")
                .arg("PX")
                .arg(ttl_ms(ttl))
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
    }

    fn release<'a>(&'a self, key: &'a str, token: &'a ClaimToken) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = format!("{PREFIX}{key}");
            let _: i64 = self
                .release
                .key(&key)
                .arg(&token.0)
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| self.err(e))?;
            Ok(())
        })
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
