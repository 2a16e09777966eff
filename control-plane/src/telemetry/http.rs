//! The telemetry endpoints: `POST /v1/telemetry` on the API (sidecars, over mTLS) and
//! `GET /api/v1/stat` on the admin listener.

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use meshlet::telemetry::report::{Report, MAX_REPORT_BYTES, TELEMETRY_PATH};

use super::stat::{stat, StatQuery};
use super::{ReportError, Telemetry};
use crate::server::{json_error, json_response, ApiBody, PeerIdentity};

/// Takes one sidecar report. Needs the caller's certificate (its identity must be the report's source).
pub async fn receive(telemetry: &Telemetry, request: Request<Incoming>) -> Response<ApiBody> {
    if request.method() != Method::POST {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            format!("{TELEMETRY_PATH} takes POST, not {}", request.method()),
        );
    }
    let Some(PeerIdentity(peer)) = request.extensions().get::<PeerIdentity>().cloned() else {
        telemetry.count("unauthenticated");
        return json_error(
            StatusCode::UNAUTHORIZED,
            "no-client-certificate",
            "telemetry reports must come over mTLS with the sidecar's certificate".into(),
        );
    };
    let body = match Limited::new(request.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            telemetry.count("invalid");
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("cannot read a report of at most {MAX_REPORT_BYTES} bytes: {error}"),
            );
        }
    };
    let report: Report = match serde_json::from_slice(&body) {
        Ok(report) => report,
        Err(error) => {
            telemetry.count("invalid");
            return json_error(
                StatusCode::BAD_REQUEST,
                "malformed-report",
                format!("not a telemetry report: {error}"),
            );
        }
    };
    match telemetry.ingest(&peer, &report) {
        Ok(outcome) => {
            telemetry.count(outcome.as_str());
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "outcome": outcome.as_str(), "sequence": report.sequence }),
            )
        }
        Err(error @ ReportError::WrongSource { .. }) => {
            telemetry.count("forbidden");
            tracing::warn!(%peer, %error, "telemetry report refused");
            json_error(StatusCode::FORBIDDEN, "wrong-source", error.to_string())
        }
        Err(error @ ReportError::Invalid(_)) => {
            telemetry.count("invalid");
            tracing::debug!(%peer, %error, "telemetry report refused");
            json_error(StatusCode::BAD_REQUEST, "invalid-report", error.to_string())
        }
    }
}

/// The golden signals as JSON.
pub fn stat_response(telemetry: &Telemetry, request: &Request<Incoming>) -> Response<ApiBody> {
    match StatQuery::parse(request.uri().query()) {
        Ok(query) => json_response(StatusCode::OK, &stat(telemetry, query)),
        Err(error) => json_error(StatusCode::BAD_REQUEST, "bad-query", error.to_string()),
    }
}
