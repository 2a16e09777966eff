//! `openssl s_client` against a listener using the mesh `server_config`: TLS 1.3 only, a client
//! certificate required, the mesh ALPN ids negotiated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use meshlet::tls::testing::{spawn_echo_server, TestCa};
use meshlet::tls::{server_config, IdentityStore, SpiffeId};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).unwrap()
}

/// Whether `openssl` can run; without it the test is skipped, except in CI where it must be installed.
fn have_openssl() -> bool {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "openssl is required in CI"
        );
        eprintln!("skipping: openssl is not installed");
    }
    found
}

fn forward_lines(
    stream: impl AsyncRead + Unpin + Send + 'static,
    lines: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
}

/// Runs `openssl s_client` against `addr` with stdin held open (so it does not hang up before the server
/// has answered), until its output contains `until` or it exits, with a bound on the wait. Returns stdout
/// and stderr together.
async fn s_client(addr: SocketAddr, extra: &[&str], until: &str) -> String {
    let mut child = Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    let (lines, mut rx) = mpsc::unbounded_channel();
    forward_lines(child.stdout.take().unwrap(), lines.clone());
    forward_lines(child.stderr.take().unwrap(), lines);

    let mut output = String::new();
    let collect = async {
        while let Some(line) = rx.recv().await {
            output.push_str(&line);
            output.push('\n');
            if output.contains(until) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), collect).await;
    let _ = child.kill().await;
    drop(stdin);
    output
}

struct Files(PathBuf);

impl Files {
    fn new(ca: &TestCa) -> Self {
        let dir = std::env::temp_dir().join(format!("meshlet-tls-openssl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let leaf = ca.issue_for(&id("client"), HOUR);
        std::fs::write(dir.join("ca.pem"), ca.trust_bundle_pem()).unwrap();
        // s_client sends only the first certificate of -cert; the intermediate goes in -cert_chain.
        let end = "-----END CERTIFICATE-----\n";
        let (first, rest) = leaf
            .chain_pem
            .split_at(leaf.chain_pem.find(end).unwrap() + end.len());
        std::fs::write(dir.join("client.pem"), first).unwrap();
        std::fs::write(dir.join("intermediate.pem"), rest).unwrap();
        std::fs::write(dir.join("client.key"), &leaf.key_pem).unwrap();
        Files(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn s_client_sees_tls13_and_a_required_client_certificate() {
    if !have_openssl() {
        return;
    }
    let ca = TestCa::new("mesh");
    let files = Files::new(&ca);
    let server = IdentityStore::with_credentials(ca.credentials(&id("server"), HOUR));
    let (addr, _outcomes) = spawn_echo_server(server_config(&server).unwrap()).await;

    // Without a client certificate: TLS 1.3 is negotiated, then the server refuses with
    // `certificate_required` (alert 116) once it sees the empty Certificate message.
    let out = s_client(
        addr,
        &["-alpn", "meshlet/tcp", "-CAfile", &files.path("ca.pem")],
        "alert number",
    )
    .await;
    assert!(out.contains("TLSv1.3"), "{out}");
    assert!(
        out.contains("Requested Signature Algorithms"),
        "the server asked for a client certificate:\n{out}"
    );
    assert!(
        out.contains("certificate required") && out.contains("alert number 116"),
        "{out}"
    );
    assert!(out.contains("ALPN protocol: meshlet/tcp"), "{out}");
    assert!(
        out.contains("Verify return code: 0 (ok)"),
        "the server's chain verifies against the bundle:\n{out}"
    );

    // TLS 1.2 is refused outright.
    let out = s_client(
        addr,
        &["-tls1_2", "-CAfile", &files.path("ca.pem")],
        "alert",
    )
    .await;
    assert!(
        out.contains("alert protocol version") || out.contains("protocol version"),
        "{out}"
    );
    assert!(!out.contains("New, TLSv1.2"), "{out}");

    // With a mesh client certificate the server accepts and reports the client's identity.
    let args = [
        "-alpn",
        "meshlet/h2",
        "-CAfile",
        &files.path("ca.pem"),
        "-cert",
        &files.path("client.pem"),
        "-cert_chain",
        &files.path("intermediate.pem"),
        "-key",
        &files.path("client.key"),
    ];
    let greeting = format!("{} meshlet/h2", id("client"));
    let out = s_client(addr, &args, &greeting).await;
    assert!(out.contains(&greeting), "{out}");
    assert!(!out.contains("alert"), "{out}");
}
