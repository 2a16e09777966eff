//! Where de-duplication state lives: a trait, so one replica can keep it in memory and several replicas can
//! share it ([`super::redis::RedisStore`]).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::error::StoreError;
use crate::policy::{full_body, Body};

/// SHA-256 of (method, path, body): what makes two requests with one key "the same request".
pub type Fingerprint = [u8; 32];

/// A boxed future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Headers not stored: they describe one connection or one encoding of the body, not the answer.
const UNSTORED_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "trailer",
    "upgrade",
];

/// A response kept for replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// Status code.
    pub status: u16,
    /// Header names and raw values.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The whole body.
    #[serde(skip)]
    pub body: Bytes,
}

impl StoredResponse {
    /// Captures a response head and its (complete) body.
    pub fn capture(status: StatusCode, headers: &HeaderMap, body: Bytes) -> StoredResponse {
        let headers = headers
            .iter()
            .filter(|(name, _)| !UNSTORED_HEADERS.contains(&name.as_str()))
            .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
            .collect();
        StoredResponse {
            status: status.as_u16(),
            headers,
            body,
        }
    }

    /// Bytes this entry occupies, for the store's byte bound.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + 64
    }

    /// A response to send: the stored one, marked `Idempotent-Replayed: true` when `replayed`.
    pub fn to_response(&self, replayed: bool) -> Response<Body> {
        let mut resp = Response::new(full_body(self.body.clone()));
        *resp.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_bytes(value),
            ) {
                resp.headers_mut().append(name, value);
            }
        }
        if replayed {
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        resp
    }
}

/// What a store holds for a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// The first request is being processed.
    InFlight {
        /// Its fingerprint.
        fingerprint: Fingerprint,
    },
    /// The first request completed with this response.
    Done {
        /// Its fingerprint.
        fingerprint: Fingerprint,
        /// Its response.
        response: StoredResponse,
    },
}

impl Entry {
    /// The fingerprint of the request that claimed the key.
    pub fn fingerprint(&self) -> &Fingerprint {
        match self {
            Entry::InFlight { fingerprint } | Entry::Done { fingerprint, .. } => fingerprint,
        }
    }
}

/// The result of trying to claim a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This request is the first: it must be processed, then completed or released with this token.
    Won(ClaimToken),
    /// Another request has the key.
    Taken(Entry),
}

/// Proves ownership of a claim, so that a late owner cannot overwrite or release someone else's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToken(pub String);

impl ClaimToken {
    /// A fresh, unique token.
    pub fn new() -> ClaimToken {
        ClaimToken(uuid::Uuid::now_v7().simple().to_string())
    }
}

impl Default for ClaimToken {
    fn default() -> Self {
        ClaimToken::new()
    }
}

/// De-duplication state shared by the requests of one service.
pub trait DedupStore: Send + Sync + 'static {
    /// Atomically claims `key` for a first request, or returns what is there.
    fn claim<'a>(
        &'a self,
        key: &'a str,
        fingerprint: Fingerprint,
        ttl: Duration,
    ) -> StoreFuture<'a, Claim>;

    /// Stores the first request's response under `key`, if the claim is still ours.
    fn complete<'a>(
        &'a self,
        key: &'a str,
        token: &'a ClaimToken,
        fingerprint: Fingerprint,
        response: StoredResponse,
        ttl: Duration,
    ) -> StoreFuture<'a, ()>;

    /// Gives the key up (the first request failed in a way a retry may repair), if the claim is still ours.
    fn release<'a>(&'a self, key: &'a str, token: &'a ClaimToken) -> StoreFuture<'a, ()>;

    /// Waits until `key` is no longer in flight or `until` passes, and returns what is there then (`None`
    /// when the key was released or expired).
    fn wait<'a>(&'a self, key: &'a str, until: Instant) -> StoreFuture<'a, Option<Entry>>;
}
