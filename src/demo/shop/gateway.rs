//! `api-gateway`: `POST /checkout` asks `order`, `customer` and `shipping` at the same time and answers with
//! all three. The order decides the status; a missing customer or shipping answer leaves its part `null`
//! (the page still renders), so only `order` can fail a checkout.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{json, not_found, Answer, Directory};
use crate::proxy::Body;

/// Handles one gateway request.
pub async fn handle(
    method: &Method,
    path: &str,
    body: &Value,
    directory: &Directory,
) -> http::Response<Body> {
    if (method, path) != (&Method::POST, "/checkout") {
        return not_found();
    }
    let customer = body.get("customer").and_then(Value::as_u64).unwrap_or(1);
    let sku: String = body
        .get("sku")
        .and_then(Value::as_str)
        .unwrap_or("tea")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    let order_body = json!({"customer": customer, "sku": sku, "qty": 1}).to_string();
    let (profile_path, quote_path) = (
        format!("/customers/{customer}"),
        format!("/quotes?sku={sku}"),
    );
    let (order, profile, quote) = tokio::join!(
        directory.call(Method::POST, "order", "/orders", Some(order_body)),
        directory.call(Method::GET, "customer", &profile_path, None),
        directory.call(Method::GET, "shipping", &quote_path, None),
    );
    let part = |answer: &Answer| match answer {
        Ok((status, body)) if status.is_success() => {
            serde_json::from_slice::<Value>(body).unwrap_or(Value::Null)
        }
        _ => Value::Null,
    };
    let (status, order_part) = match &order {
        Ok((status, body)) => (
            *status,
            serde_json::from_slice::<Value>(body).unwrap_or(Value::Null),
        ),
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            json!({"error": format!("order unreachable: {e}")}),
        ),
    };
    let answer = json!({
        "order": order_part,
        "customer": part(&profile),
        "shipping": part(&quote),
    });
    json(status, answer.to_string())
}
