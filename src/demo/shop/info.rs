//! `customer` and `shipping`: read-only services the gateway asks for each checkout.

use std::time::Duration;

use http::{Method, StatusCode};

use super::{json, not_found};
use crate::proxy::Body;

/// `GET /customers/{id}`: a profile.
pub fn customer(method: &Method, path: &str) -> http::Response<Body> {
    let Some(id) = path
        .strip_prefix("/customers/")
        .and_then(|id| id.parse::<u64>().ok())
    else {
        return not_found();
    };
    if method != Method::GET {
        return not_found();
    }
    let tier = if id % 5 == 0 { "gold" } else { "standard" };
    json(
        StatusCode::OK,
        format!(r#"{{"id":{id},"name":"customer-{id}","tier":"{tier}"}}"#),
    )
}

/// `GET /quotes?sku=...`: a shipping quote, computed in a few milliseconds.
pub async fn shipping(method: &Method, path: &str, query: &str) -> http::Response<Body> {
    if (method, path) != (&Method::GET, "/quotes") {
        return not_found();
    }
    let sku: String = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sku="))
        .unwrap_or("tea")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    tokio::time::sleep(Duration::from_millis(rand::random_range(2..12))).await;
    json(
        StatusCode::OK,
        format!(r#"{{"sku":"{sku}","carrier":"meshpost","days":2,"price_cents":300}}"#),
    )
}
