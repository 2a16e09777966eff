//! Helpers for root-only tests that build their own network namespaces.
//!
//! Every namespace, process and directory made here is removed when its guard drops, also when the test
//! fails, so the host is left as it was. Tests that touch namespaces or iptables hold `NetnsLock` so they
//! never run at the same time, even across test binaries.
//!
//! A test binary includes it next to the shared helpers it builds on:
//! `mod common;` and `#[path = "common/netns.rs"] mod netns;`.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The lock a root-only test holds while it runs, or `None` when not root: then the test is skipped with a
/// printed reason, or fails when `CI=true` (see `common::skip_or_fail`).
pub fn lock_if_root(test: &str) -> Option<NetnsLock> {
    if crate::common::is_root() {
        return Some(NetnsLock::acquire());
    }
    crate::common::skip_or_fail(&format!(
        "{test} needs root (network namespaces and iptables)"
    ));
    None
}

/// An exclusive lock on `/tmp/meshlet-netns.lock`, held until dropped.
pub struct NetnsLock(crate::common::FileLock);

impl NetnsLock {
    /// Waits until no other namespace test holds the lock.
    pub fn acquire() -> Self {
        NetnsLock(crate::common::FileLock::exclusive(
            "/tmp/meshlet-netns.lock",
        ))
    }
}

/// A network namespace named `meshlet-<tag>-<pid>` with loopback up, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn create(tag: &str) -> Self {
        let name = format!("meshlet-{tag}-{}", std::process::id());
        // A namespace left by a crashed run with the same pid would make `add` fail.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        netns.run(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `argv` inside the namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(argv);
        command
    }

    /// Runs `argv` inside the namespace, panicking with its output unless it succeeds; returns stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        run_ok(&mut self.command(argv))
    }

    /// Starts `argv` inside the namespace in its own process group, output going to `log`.
    pub fn spawn(&self, argv: &[&str], log: &Path) -> Background {
        Background::spawn(self.command(argv), log)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command to completion and returns its stdout, or panics with its status and output.
pub fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("could not run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Status, stdout and stderr of a finished command, for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A process started in its own process group (like `setsid`), killed with its group on drop.
pub struct Background {
    child: Child,
    log: PathBuf,
}

impl Background {
    pub fn spawn(mut command: Command, log: &Path) -> Self {
        let out = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file");
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {command:?}: {e}"));
        Background {
            child,
            log: log.to_path_buf(),
        }
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the process's output if it has already exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{what} exited early ({status}); its output:\n{}",
                self.log()
            );
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill has no memory-safety preconditions; the group is the one this child leads.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A directory under /tmp that any user can read (a process running as the proxy uid cannot read /root),
/// removed on drop.
pub struct SharedDir(PathBuf);

impl SharedDir {
    pub fn create(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("meshlet-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create shared dir");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod shared dir");
        SharedDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Copies an executable into the directory, readable and runnable by everyone.
    pub fn install_executable(&self, source: &str) -> PathBuf {
        let name = Path::new(source)
            .file_name()
            .expect("executable has a file name");
        let target = self.0.join(name);
        fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {source}: {e}"));
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).expect("chmod executable");
        target
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Retries `check` every 100 ms until it returns `Some` or `limit` passes; panics with `what` on the deadline.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "gave up after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}
