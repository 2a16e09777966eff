//! The thin layer that runs `iptables-save` and `iptables-restore` for one family and mode.
//!
//! Only the `-save`/`-restore` tools are used: reading the table and replacing our part of it each take one
//! call, and a restore is applied as one transaction, so the pod never sees half a rule set.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use super::rules::Family;
use super::{InitError, IptablesMode};

/// Seconds to wait for the xtables lock when another tool (kube-proxy, a CNI plugin) holds it.
const LOCK_WAIT_SECS: &str = "5";

/// The iptables tools of one family in one mode, e.g. `ip6tables-nft-save` and `ip6tables-nft-restore`.
pub struct Iptables {
    save: String,
    restore: String,
}

impl Iptables {
    /// Names the tools; nothing runs until `save_nat` or `restore`.
    pub fn new(mode: IptablesMode, family: Family) -> Self {
        let family = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let mode = match mode {
            IptablesMode::Nft => "nft",
            IptablesMode::Legacy => "legacy",
        };
        Iptables {
            save: format!("{family}-{mode}-save"),
            restore: format!("{family}-{mode}-restore"),
        }
    }

    /// The command that applies a script, as shown by `--dry-run`.
    pub fn restore_command(&self) -> String {
        format!("{} --noflush -w {LOCK_WAIT_SECS}", self.restore)
    }

    /// The current nat table in `iptables-save` syntax.
    pub fn save_nat(&self) -> Result<String, InitError> {
        let output = Command::new(&self.save)
            .args(["-t", "nat"])
            .output()
            .map_err(|source| InitError::Spawn {
                program: self.save.clone(),
                source,
            })?;
        let output = succeeded(format!("{} -t nat", self.save), output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Applies a script with `--noflush`, so only the chains and rules it names change.
    pub fn restore(&self, script: &str) -> Result<(), InitError> {
        let mut child = Command::new(&self.restore)
            .args(["--noflush", "-w", LOCK_WAIT_SECS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| InitError::Spawn {
                program: self.restore.clone(),
                source,
            })?;
        // A restore that stops reading early has failed; its exit status and stderr say why.
        let written = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(script.as_bytes()),
            None => Ok(()),
        };
        let output = child
            .wait_with_output()
            .map_err(|source| InitError::Spawn {
                program: self.restore.clone(),
                source,
            })?;
        succeeded(self.restore_command(), output)?;
        written.map_err(|source| InitError::Write {
            program: self.restore.clone(),
            source,
        })?;
        Ok(())
    }
}

/// The output of a command that exited with success, or an error carrying its stderr.
fn succeeded(command: String, output: Output) -> Result<Output, InitError> {
    if output.status.success() {
        return Ok(output);
    }
    Err(InitError::Failed {
        command,
        status: output.status,
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}
