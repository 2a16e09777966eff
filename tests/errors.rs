//! Bad input to the explicit-proxy listener: each gets the documented answer (`x-meshlet-error: <reason>`),
//! is counted in `meshlet_proxy_errors_total`, never hangs the client, and never stops the proxy from serving
//! a good request sent on another connection while the bad one is in progress.
//!
//! Each scenario runs twice: alone on a proxy of its own (its reason counted exactly once), and together with
//! every other scenario at once on one proxy (each reason counted as often as it was caused).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;

/// Short limits so the timeout cases finish quickly; the good request is far inside all of them.
const FLAGS: &[&str] = &[
    "--header-read-timeout",
    "1s",
    "--max-header-bytes",
    "4096",
    "--response-timeout",
    "1s",
];

/// How long a client waits for an answer before the test calls the proxy hung.
const PATIENCE: Duration = Duration::from_secs(10);

/// A proxy with [`FLAGS`] and an origin that records the paths it was asked for.
struct Setup {
    proxy: Proxy,
    origin: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl Setup {
    fn new() -> Setup {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let (rt, origin) = origin_on_runtime(move |req| {
            let record = record.clone();
            async move {
                let path = req.uri().path().to_string();
                record.lock().unwrap().push(path.clone());
                if path == "/slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                // Read the whole body before answering, so a broken body is noticed before the response.
                let received = match req.into_body().collect().await {
                    Ok(body) => body.to_bytes().len(),
                    Err(_) => {
                        return http::Response::builder()
                            .status(499)
                            .body(full(""))
                            .unwrap()
                    }
                };
                http::Response::new(full(format!("hello {received}")))
            }
        });
        Setup {
            proxy: Proxy::start(FLAGS),
            origin,
            seen,
            _rt: rt,
        }
    }

    /// A client connection to the explicit proxy, with bounded reads and writes.
    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.proxy.outbound).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream.set_write_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    /// An ordinary absolute-form GET on its own connection, which must succeed.
    fn good_request(&self) {
        let origin = self.origin;
        let req = format!(
            "GET http://{origin}/good HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n"
        );
        let rsp = raw_request(self.proxy.outbound, req.as_bytes()).expect("good request");
        assert_eq!(rsp.status, 200, "good request failed: {rsp:?}");
        assert_eq!(rsp.body, b"hello 0");
    }

    /// An upstream's failure is not the client's: the same client connection serves the next request.
    fn good_request_on(&self, stream: &mut TcpStream) {
        send_get(stream, self.origin, "/good");
        let rsp = read_response(stream).expect("a response on the reused connection");
        assert_eq!(rsp.status, 200, "{rsp:?}");
        assert_eq!(rsp.body, b"hello 0");
    }

    /// How often the proxy has answered with `reason`.
    fn errors(&self, reason: &str) -> f64 {
        self.proxy.metric_sum(
            "meshlet_proxy_errors_total",
            &["direction=\"outbound\"", &format!("reason=\"{reason}\"")],
        )
    }

    fn origin_saw(&self, path: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|p| p == path)
    }
}

/// Sends a keep-alive absolute-form `GET http://{dst}{path}`.
fn send_get(stream: &mut TcpStream, dst: SocketAddr, path: &str) {
    let req = format!("GET http://{dst}{path} HTTP/1.1\r\nHost: {dst}\r\n\r\n");
    stream.write_all(req.as_bytes()).expect("send a request");
}

/// Reads until the proxy closes the connection (a reset counts as closed); panics if it never does.
fn read_until_closed(stream: &mut TcpStream, mut received: Vec<u8>) -> Vec<u8> {
    let mut chunk = [0u8; 16384];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return received
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "the proxy neither answered nor closed within {PATIENCE:?}; got {received:?}"
                )
            }
            Err(e) => panic!("reading from the proxy failed: {e}"),
        }
    }
}

/// The head and body of a response read to its connection's close.
fn parse_response(bytes: &[u8]) -> RawResponse {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut rsp = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = rsp.parse(bytes) else {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(bytes)
        );
    };
    RawResponse {
        status: rsp.code.unwrap_or(0),
        headers: rsp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).to_string(),
                )
            })
            .collect(),
        body: bytes[head_len..].to_vec(),
    }
}

/// The proxy answered `status` with `x-meshlet-error: reason`, then closed the connection.
fn expect_refusal(stream: &mut TcpStream, status: u16, reason: &str) -> RawResponse {
    expect_refusal_after(stream, Vec::new(), status, reason)
}

fn expect_refusal_after(
    stream: &mut TcpStream,
    received: Vec<u8>,
    status: u16,
    reason: &str,
) -> RawResponse {
    let rsp = parse_response(&read_until_closed(stream, received));
    assert_eq!(rsp.status, status, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some(reason), "{rsp:?}");
    assert!(
        String::from_utf8_lossy(&rsp.body).contains(reason),
        "body should name the reason: {rsp:?}"
    );
    rsp
}

fn garbage_bytes_get_400_malformed_request(setup: &Setup) {
    let mut bad = setup.connect();
    bad.write_all(b"\x16\x00\xffgarbage\x01\x02\r\n\r\n")
        .unwrap();
    setup.good_request();
    expect_refusal(&mut bad, 400, "malformed-request");
}

fn truncated_request_line_then_eof_gets_400(setup: &Setup) {
    let mut bad = setup.connect();
    bad.write_all(format!("GET http://{}/truncated HT", setup.origin).as_bytes())
        .unwrap();
    setup.good_request();
    bad.shutdown(Shutdown::Write).unwrap();
    expect_refusal(&mut bad, 400, "malformed-request");
    assert!(!setup.origin_saw("/truncated"));
}

fn truncated_request_line_then_silence_gets_408(setup: &Setup) {
    let mut bad = setup.connect();
    bad.write_all(format!("GET http://{}/silent HT", setup.origin).as_bytes())
        .unwrap();
    setup.good_request();
    expect_refusal(&mut bad, 408, "header-read-timeout");
    assert!(!setup.origin_saw("/silent"));
}

fn oversized_headers_get_431(setup: &Setup) {
    let mut bad = setup.connect();
    let origin = setup.origin;
    bad.write_all(format!("GET http://{origin}/big HTTP/1.1\r\nHost: {origin}\r\n").as_bytes())
        .unwrap();
    setup.good_request();
    let big = format!("X-Big: {}\r\n\r\n", "a".repeat(20_000));
    // The proxy may refuse (and stop reading) before every byte is written.
    let _ = bad.write_all(big.as_bytes());
    expect_refusal(&mut bad, 431, "headers-too-large");
    assert!(!setup.origin_saw("/big"));
}

fn slowloris_gets_408(setup: &Setup) {
    let mut bad = setup.connect();
    let origin = setup.origin;
    bad.write_all(
        format!("GET http://{origin}/slowloris HTTP/1.1\r\nHost: {origin}\r\n").as_bytes(),
    )
    .unwrap();
    // One header byte every 200 ms, until the proxy answers; the head is never finished.
    bad.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let trickle = b"X-Slow: ".iter().chain([b'a'; 100].iter());
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    for (i, byte) in trickle.enumerate() {
        if bad.write_all(&[*byte]).is_err() {
            break;
        }
        if i == 2 {
            setup.good_request();
        }
        match bad.read(&mut chunk) {
            Ok(n) => {
                received.extend_from_slice(&chunk[..n]);
                break;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    bad.set_read_timeout(Some(PATIENCE)).unwrap();
    expect_refusal_after(&mut bad, received, 408, "header-read-timeout");
    assert!(!setup.origin_saw("/slowloris"));
}

fn invalid_chunked_body_gets_400_and_the_connection_closes(setup: &Setup) {
    let mut bad = setup.connect();
    let origin = setup.origin;
    bad.write_all(
        format!("POST http://{origin}/chunked HTTP/1.1\r\nHost: {origin}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .as_bytes(),
    )
    .unwrap();
    setup.good_request();
    // Not a hexadecimal chunk size; the connection stays open on our side, so only the proxy can end it.
    bad.write_all(b"zz\r\nnot a chunk\r\n").unwrap();
    expect_refusal(&mut bad, 400, "malformed-body");
}

/// A CL.TE smuggling attempt: a parser that trusts `Content-Length` sees one POST, one that trusts
/// `Transfer-Encoding` sees an empty POST and then a second request, `GET /smuggled`.
fn smuggling_request(origin: SocketAddr) -> String {
    let tail = format!("0\r\n\r\nGET http://{origin}/smuggled HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    format!(
        "POST http://{origin}/smuggle HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{tail}",
        tail.len()
    )
}

fn content_length_with_transfer_encoding_gets_400_and_never_reaches_the_origin(setup: &Setup) {
    let mut bad = setup.connect();
    let smuggle = smuggling_request(setup.origin);
    let (first, rest) = smuggle.as_bytes().split_at(smuggle.len() - 10);
    bad.write_all(first).unwrap();
    setup.good_request();
    bad.write_all(rest).unwrap();
    expect_refusal(&mut bad, 400, "content-length-and-transfer-encoding");
    assert!(!setup.origin_saw("/smuggle") && !setup.origin_saw("/smuggled"));
}

/// The same attempt as the second request of a kept-alive connection, which hyper's parser checks: whatever
/// the answer, the smuggled request never reaches the origin and the connection ends after one response.
fn content_length_with_transfer_encoding_later_on_a_connection_is_not_smuggled(setup: &Setup) {
    let mut bad = setup.connect();
    setup.good_request_on(&mut bad);
    bad.write_all(smuggling_request(setup.origin).as_bytes())
        .unwrap();
    let received = read_until_closed(&mut bad, Vec::new());
    let rsp = parse_response(&received);
    assert!(matches!(rsp.status, 200 | 400), "{rsp:?}");
    let answers = received.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert_eq!(
        answers,
        1,
        "one answer, then close: {:?}",
        String::from_utf8_lossy(&received)
    );
    assert!(
        !setup.origin_saw("/smuggled"),
        "the smuggled request reached the origin"
    );
}

/// HTTP/2 that breaks the protocol right after the preface (a DATA frame on stream 0 instead of SETTINGS)
/// gets a GOAWAY and a closed connection.
fn h2_protocol_error_gets_goaway(setup: &Setup) {
    let mut bad = setup.connect();
    bad.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    setup.good_request();
    // Frame header: length 5, type DATA (0), no flags, stream 0; then the payload.
    bad.write_all(b"\x00\x00\x05\x00\x00\x00\x00\x00\x00hello")
        .unwrap();
    let received = read_until_closed(&mut bad, Vec::new());
    let mut frame_types = Vec::new();
    let mut rest = &received[..];
    while rest.len() >= 9 {
        let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        frame_types.push(rest[3]);
        rest = &rest[(9 + length).min(rest.len())..];
    }
    const GOAWAY: u8 = 0x7;
    assert!(
        frame_types.contains(&GOAWAY),
        "frames received: {frame_types:?}"
    );
}

fn refused_upstream_gets_502_connect_refused(setup: &Setup) {
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut bad = setup.connect();
    setup.good_request();
    send_get(&mut bad, closed, "/");
    let rsp = read_response(&mut bad).expect("an answer for the refused upstream");
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("connect-refused"));
    setup.good_request_on(&mut bad);
}

/// An origin that reads one request head, answers with `answer` bytes, then resets the connection
/// (`SO_LINGER` 0) instead of closing it.
fn resetting_origin(answer: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = stream.write_all(&answer);
        let _ = stream.flush();
        // Let the bytes reach the proxy before the reset overtakes them.
        std::thread::sleep(Duration::from_millis(200));
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    addr
}

fn upstream_reset_before_responding_gets_502_upstream_reset(setup: &Setup) {
    let resetter = resetting_origin(Vec::new());
    let mut bad = setup.connect();
    send_get(&mut bad, resetter, "/");
    setup.good_request();
    let rsp = read_response(&mut bad).expect("an answer for the reset upstream");
    assert_eq!(rsp.status, 502, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("upstream-reset"));
    setup.good_request_on(&mut bad);
}

fn upstream_reset_mid_body_truncates_the_response_and_closes(setup: &Setup) {
    let declared = 1_000_000;
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n").into_bytes();
    answer.extend(std::iter::repeat_n(b'x', 10_000));
    let resetter = resetting_origin(answer);
    let mut bad = setup.connect();
    send_get(&mut bad, resetter, "/");
    setup.good_request();
    let rsp = parse_response(&read_until_closed(&mut bad, Vec::new()));
    assert_eq!(rsp.status, 200, "the head was already forwarded: {rsp:?}");
    assert_eq!(rsp.header("content-length"), Some("1000000"));
    assert!(
        rsp.body.len() < declared,
        "the body cannot be complete: {} bytes",
        rsp.body.len()
    );
}

fn slow_upstream_gets_504_response_timeout(setup: &Setup) {
    let mut bad = setup.connect();
    let origin = setup.origin;
    send_get(&mut bad, origin, "/slow");
    setup.good_request();
    let rsp = read_response(&mut bad).expect("an answer for the slow upstream");
    assert_eq!(rsp.status, 504, "{rsp:?}");
    assert_eq!(rsp.header("x-meshlet-error"), Some("response-timeout"));
    assert!(setup.origin_saw("/slow"));
    setup.good_request_on(&mut bad);
}

/// One bad client (or upstream) and its checks, beside a concurrent good request.
type Scenario = fn(&Setup);

/// Every bad-input scenario and the reason it is counted under (`None`: no answer of the proxy's own).
const SCENARIOS: &[(Scenario, Option<&str>)] = &[
    (
        garbage_bytes_get_400_malformed_request,
        Some("malformed-request"),
    ),
    (
        truncated_request_line_then_eof_gets_400,
        Some("malformed-request"),
    ),
    (
        truncated_request_line_then_silence_gets_408,
        Some("header-read-timeout"),
    ),
    (oversized_headers_get_431, Some("headers-too-large")),
    (slowloris_gets_408, Some("header-read-timeout")),
    (
        invalid_chunked_body_gets_400_and_the_connection_closes,
        Some("malformed-body"),
    ),
    (
        content_length_with_transfer_encoding_gets_400_and_never_reaches_the_origin,
        Some("content-length-and-transfer-encoding"),
    ),
    (
        content_length_with_transfer_encoding_later_on_a_connection_is_not_smuggled,
        None,
    ),
    (h2_protocol_error_gets_goaway, None),
    (
        refused_upstream_gets_502_connect_refused,
        Some("connect-refused"),
    ),
    (
        upstream_reset_before_responding_gets_502_upstream_reset,
        Some("upstream-reset"),
    ),
    (
        upstream_reset_mid_body_truncates_the_response_and_closes,
        None,
    ),
    (
        slow_upstream_gets_504_response_timeout,
        Some("response-timeout"),
    ),
];

/// One scenario on a proxy of its own: its reason is counted exactly once, and the proxy still serves.
fn run_alone(scenario: Scenario, reason: Option<&str>) {
    let mut setup = Setup::new();
    scenario(&setup);
    assert!(still_running(&mut setup.proxy), "the proxy exited");
    setup.good_request();
    if let Some(reason) = reason {
        assert_eq!(
            setup.errors(reason),
            1.0,
            "meshlet_proxy_errors_total for {reason}:\n{}",
            setup.proxy.metrics()
        );
    }
}

#[test]
fn garbage_bytes_get_400_malformed_request_alone() {
    run_alone(
        garbage_bytes_get_400_malformed_request,
        Some("malformed-request"),
    );
}

#[test]
fn truncated_request_line_then_eof_gets_400_alone() {
    run_alone(
        truncated_request_line_then_eof_gets_400,
        Some("malformed-request"),
    );
}

#[test]
fn truncated_request_line_then_silence_gets_408_alone() {
    run_alone(
        truncated_request_line_then_silence_gets_408,
        Some("header-read-timeout"),
    );
}

#[test]
fn oversized_headers_get_431_alone() {
    run_alone(oversized_headers_get_431, Some("headers-too-large"));
}

#[test]
fn slowloris_gets_408_alone() {
    run_alone(slowloris_gets_408, Some("header-read-timeout"));
}

#[test]
fn invalid_chunked_body_gets_400_and_the_connection_closes_alone() {
    run_alone(
        invalid_chunked_body_gets_400_and_the_connection_closes,
        Some("malformed-body"),
    );
}

#[test]
fn content_length_with_transfer_encoding_gets_400_and_never_reaches_the_origin_alone() {
    run_alone(
        content_length_with_transfer_encoding_gets_400_and_never_reaches_the_origin,
        Some("content-length-and-transfer-encoding"),
    );
}

#[test]
fn content_length_with_transfer_encoding_later_on_a_connection_is_not_smuggled_alone() {
    run_alone(
        content_length_with_transfer_encoding_later_on_a_connection_is_not_smuggled,
        None,
    );
}

#[test]
fn h2_protocol_error_gets_goaway_alone() {
    run_alone(h2_protocol_error_gets_goaway, None);
}

#[test]
fn refused_upstream_gets_502_connect_refused_alone() {
    run_alone(
        refused_upstream_gets_502_connect_refused,
        Some("connect-refused"),
    );
}

#[test]
fn upstream_reset_before_responding_gets_502_upstream_reset_alone() {
    run_alone(
        upstream_reset_before_responding_gets_502_upstream_reset,
        Some("upstream-reset"),
    );
}

#[test]
fn upstream_reset_mid_body_truncates_the_response_and_closes_alone() {
    run_alone(
        upstream_reset_mid_body_truncates_the_response_and_closes,
        None,
    );
}

#[test]
fn slow_upstream_gets_504_response_timeout_alone() {
    run_alone(
        slow_upstream_gets_504_response_timeout,
        Some("response-timeout"),
    );
}

/// Every scenario at once against one proxy: each still gets its own answer, and every reason is counted
/// as often as it was caused.
#[test]
fn every_bad_input_at_once_on_one_proxy() {
    let mut setup = Setup::new();
    std::thread::scope(|scope| {
        for (scenario, _) in SCENARIOS {
            let setup = &setup;
            scope.spawn(move || scenario(setup));
        }
    });
    assert!(still_running(&mut setup.proxy), "the proxy exited");
    setup.good_request();
    let mut expected = std::collections::BTreeMap::new();
    for reason in SCENARIOS.iter().filter_map(|(_, reason)| *reason) {
        *expected.entry(reason).or_insert(0.0) += 1.0;
    }
    for (reason, count) in expected {
        assert_eq!(
            setup.errors(reason),
            count,
            "meshlet_proxy_errors_total for {reason}:\n{}",
            setup.proxy.metrics()
        );
    }
}
