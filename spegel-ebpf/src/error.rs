//! Why eBPF telemetry is off: every variant reads as one log line.

use std::{io, path::PathBuf};

/// Why the probes could not be placed, loaded, attached or read.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The process lacks the capabilities (or the kernel refused the `bpf()` call with EPERM).
    #[error(
        "eBPF needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN) in the host user namespace: {0}"
    )]
    NoPrivileges(String),
    /// No cgroup v2 to attach to (cgroup v1 only, or not mounted).
    #[error("no cgroup v2: {0}")]
    NoCgroupV2(String),
    /// Reading, creating or joining a cgroup failed.
    #[error("cgroup {}: {what}: {source}", path.display())]
    Cgroup {
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The object could not be loaded, or the verifier rejected a program.
    #[error("loading eBPF program `{program}` failed: {message}{}", last_line(log))]
    Load {
        /// Program (or map) name.
        program: String,
        /// The loader's message.
        message: String,
        /// The kernel verifier's full log (empty when the failure came before the verifier).
        log: String,
    },
    /// Attaching a loaded program failed.
    #[error("attaching eBPF program `{program}` to cgroup {}: {message}", path.display())]
    Attach {
        /// Program name.
        program: String,
        /// The cgroup directory.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// Reading or updating a map failed.
    #[error("eBPF map `{map}`: {message}")]
    Map {
        /// Map name.
        map: String,
        /// The loader's message.
        message: String,
    },
}

impl EbpfError {
    /// The verifier's full log when a program was rejected (log it at debug level; the
    /// one-line message carries only its last line).
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            EbpfError::Load { log, .. } if !log.trim().is_empty() => Some(log),
            _ => None,
        }
    }
}

/// The verifier's last non-empty line, which names the rejected instruction's reason.
fn last_line(log: &str) -> String {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty() && !l.starts_with("processed ") && !l.starts_with("verification time")
        })
        .map(|l| format!("; verifier: {l}"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_error_is_one_line_with_the_verifiers_reason() {
        let e = EbpfError::Load {
            program: "peer_tcp".into(),
            message: "BPF_PROG_LOAD: Permission denied".into(),
            log: "0: (61) r2 = *(u32 *)(r1 +0)\n; R1 dereference of modified ctx ptr\nprocessed 10 insns\n".into(),
        };
        let text = e.to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(
            text.ends_with("verifier: ; R1 dereference of modified ctx ptr"),
            "{text}"
        );
        assert!(e.verifier_log().is_some_and(|l| l.contains("(61)")));
    }

    #[test]
    fn load_error_without_log_says_so_plainly() {
        let e = EbpfError::Load {
            program: "peer_tcp".into(),
            message: "bad ELF".into(),
            log: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "loading eBPF program `peer_tcp` failed: bad ELF"
        );
        assert!(e.verifier_log().is_none());
    }
}
