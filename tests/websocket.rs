//! WebSocket through the explicit proxy: a real `websockets` echo server, reached with an absolute-form
//! upgrade request from a raw client and through `CONNECT` by the `websockets` client; and an `h2c` upgrade,
//! which the proxy must not forward.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// The handshake example of RFC 6455 §1.3: this key must be answered with this accept value.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CLOSE: u8 = 0x8;

/// One final client frame (RFC 6455 §5.2), masked as clients must; payloads up to 64 KiB.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(
                &u16::try_from(len)
                    .expect("payload up to 64 KiB")
                    .to_be_bytes(),
            );
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads one unmasked server frame: (FIN and opcode byte, payload).
fn read_server_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("frame head");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).unwrap();
            u16::from_be_bytes(ext) as usize
        }
        127 => panic!("unexpectedly long frame"),
        len => len as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).expect("frame payload");
    (head[0], payload)
}

#[test]
fn websocket_echo_through_an_absolute_form_upgrade() {
    let Some(server) = python_server_or_skip("ws_echo_server.py", "websockets", "websockets")
    else {
        return;
    };
    let proxy = Proxy::start(&[]);
    let dst = server.addr();

    let mut stream = TcpStream::connect(proxy.outbound).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let handshake = format!(
        "GET http://{dst}/chat HTTP/1.1\r\nHost: {dst}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).unwrap();
    let rsp = read_response(&mut stream).expect("handshake answer");
    assert_eq!(rsp.status, 101, "{rsp:?}");
    assert!(
        rsp.body.is_empty(),
        "no frame before the client's first message: {rsp:?}"
    );
    assert_eq!(rsp.header("sec-websocket-accept"), Some(ACCEPT), "{rsp:?}");
    assert!(
        rsp.header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{rsp:?}"
    );

    for message in ["hello through meshlet".to_string(), "ü".repeat(200)] {
        stream
            .write_all(&client_frame(OPCODE_TEXT, message.as_bytes()))
            .unwrap();
        let (head, payload) = read_server_frame(&mut stream);
        assert_eq!(head, 0x80 | OPCODE_TEXT, "a final text frame");
        assert_eq!(String::from_utf8(payload).unwrap(), message);
    }

    // A clean close: the server answers our close frame with its own, then ends the connection.
    stream
        .write_all(&client_frame(OPCODE_CLOSE, &1000u16.to_be_bytes()))
        .unwrap();
    let (head, payload) = read_server_frame(&mut stream);
    assert_eq!(head, 0x80 | OPCODE_CLOSE);
    assert_eq!(payload[..2], 1000u16.to_be_bytes());
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).expect("the tunnel closes"), 0);

    let metrics = proxy.metrics();
    assert_eq!(
        sum_metric(
            &metrics,
            "meshlet_requests_total",
            &[&format!("destination=\"{dst}\""), "status_code=\"101\""]
        ),
        1.0,
        "{metrics}"
    );
}

#[test]
fn websocket_client_through_connect() {
    let Some(server) = python_server_or_skip(
        "ws_echo_server.py",
        "websockets.asyncio.client",
        "websockets",
    ) else {
        return;
    };
    let proxy = Proxy::start(&[]);
    let out = run_python(
        "ws_client.py",
        &[
            &format!("ws://{}/echo", server.addr()),
            &format!("http://{}", proxy.outbound),
        ],
        Duration::from_secs(60),
    );
    assert!(out.starts_with("OK 4 messages echoed"), "{out}");
    let metrics = proxy.metrics();
    assert_eq!(
        sum_metric(
            &metrics,
            "meshlet_requests_total",
            &["method=\"CONNECT\"", "status_code=\"200\""]
        ),
        1.0,
        "the client tunnelled through the proxy:\n{metrics}"
    );
}

#[test]
fn h2c_upgrade_is_not_forwarded() {
    let (_rt, origin) = origin_on_runtime(|req| async move {
        let mut seen: Vec<String> = req
            .headers()
            .keys()
            .map(|k| k.as_str().to_string())
            .collect();
        seen.sort();
        http::Response::new(full(seen.join("\n")))
    });
    let proxy = Proxy::start(&[]);
    let req = format!(
        "GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Request-Id: keep-me\r\n\r\n"
    );
    let rsp = raw_request(proxy.outbound, req.as_bytes()).expect("an answer");
    assert_eq!(
        rsp.status, 200,
        "served as plain HTTP/1.1, not switched: {rsp:?}"
    );
    assert!(rsp.header("upgrade").is_none(), "{rsp:?}");
    let received = String::from_utf8(rsp.body).unwrap();
    let received: Vec<&str> = received.lines().collect();
    for dropped in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !received.contains(&dropped),
            "the origin saw {dropped}: {received:?}"
        );
    }
    assert!(
        received.contains(&"x-request-id") && received.contains(&"host"),
        "{received:?}"
    );
}
