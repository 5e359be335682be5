//! Finding (and, on a bare machine, creating) the cgroup v2 the probes attach to.
//!
//! sock_ops programs see the sockets of one cgroup and its descendants. The daemon attaches
//! to its own cgroup so it sees its own connections and nothing else; on a machine where the
//! daemon sits in the v2 root (no container), that root would see every socket of the
//! machine, so the daemon makes a child cgroup `spegel-<pid>` and joins it first.

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::EbpfError;

/// Where the probes attach: the daemon's own cgroup v2, or a child it created and joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlacement {
    /// The cgroup directory (inside the cgroup2 mount).
    pub path: PathBuf,
    /// Whether [`place_in_cgroup`] created it (and moved the process into it).
    pub created: bool,
}

impl CgroupPlacement {
    /// Undoes [`place_in_cgroup`] at shutdown: moves the process back to the parent cgroup
    /// and removes the child it created. Does nothing for a cgroup it did not create.
    pub fn release(&self) -> Result<(), EbpfError> {
        if !self.created {
            return Ok(());
        }
        let Some(parent) = self.path.parent() else {
            return Ok(());
        };
        join(parent, std::process::id())?;
        match std::fs::remove_dir(&self.path) {
            // Released before (release is idempotent: the owner also calls it on drop).
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(|source| EbpfError::Cgroup {
                path: self.path.clone(),
                what: "removing",
                source,
            }),
        }
    }
}

/// Finds this process's cgroup v2 (/proc/self/cgroup `0::PATH` + cgroup2 mount from
/// /proc/self/mountinfo); if it is the machine's root, creates a child `spegel-<pid>` and moves
/// the process into it. Inside a container with its own cgroup namespace, uses `0::/` as is.
pub fn place_in_cgroup() -> Result<CgroupPlacement, EbpfError> {
    let dir = own_cgroup_dir()?;
    if !is_machine_root(&dir) {
        return Ok(CgroupPlacement {
            path: dir,
            created: false,
        });
    }
    let pid = std::process::id();
    remove_stale_children(&dir, pid);
    let child = dir.join(format!("spegel-{pid}"));
    match std::fs::create_dir(&child) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e)
            if e.kind() == io::ErrorKind::PermissionDenied
                || e.raw_os_error() == Some(libc::EROFS) =>
        {
            return Err(EbpfError::NoPrivileges(format!(
                "cannot create {} ({e}); the process is in the machine's root cgroup, which would see every socket",
                child.display()
            )));
        }
        Err(source) => {
            return Err(EbpfError::Cgroup {
                path: child,
                what: "creating",
                source,
            });
        }
    }
    if let Err(e) = join(&child, pid) {
        let _ = std::fs::remove_dir(&child);
        return Err(e);
    }
    tracing::debug!(cgroup = %child.display(), "joined a child cgroup of the root for the eBPF probes");
    Ok(CgroupPlacement {
        path: child,
        created: true,
    })
}

/// The cgroup v2 directory this process is in.
pub fn own_cgroup_dir() -> Result<PathBuf, EbpfError> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|source| EbpfError::Cgroup {
            path: p.into(),
            what: "reading",
            source,
        })
    };
    let cgroup = read("/proc/self/cgroup")?;
    let mountinfo = read("/proc/self/mountinfo")?;
    let rel = unified_path(&cgroup).ok_or_else(|| {
        EbpfError::NoCgroupV2("no `0::` line in /proc/self/cgroup (cgroup v1 only)".into())
    })?;
    let (mount_point, mount_root) = match cgroup2_mount(&mountinfo) {
        Some(m) => m,
        None => mount_private_cgroup2()?,
    };
    resolve(&mount_point, &mount_root, &rel).ok_or_else(|| {
        EbpfError::NoCgroupV2(format!(
            "this process's cgroup {rel} is outside the cgroup2 mount at {} (root {mount_root})",
            mount_point.display()
        ))
    })
}

/// Where [`mount_private_cgroup2`] mounts the hierarchy (only ever inside a private mount
/// namespace, so every daemon has its own mount on the same empty directory).
const PRIVATE_MOUNT: &str = "/run/spegel-ebpf-cgroup2";

/// Mounts the cgroup2 hierarchy when this process sees none, which is what `ip netns exec`
/// leaves (it remounts /sys for the network namespace, hiding /sys/fs/cgroup). Done only in a
/// mount namespace of our own, where the mount disappears with the process; in the machine's
/// mount namespace a missing cgroup2 mount is the administrator's choice and is reported.
fn mount_private_cgroup2() -> Result<(PathBuf, String), EbpfError> {
    // Private: a different mount namespace from PID 1's or the parent's (`ip netns exec`
    // unshares it right before exec), whichever of the two can be read.
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let own = ns("self");
    // SAFETY: getppid has no preconditions.
    let parent = ns(&unsafe { libc::getppid() }.to_string());
    let private = own.is_some()
        && [ns("1"), parent]
            .into_iter()
            .flatten()
            .any(|other| Some(other) != own);
    if !private {
        return Err(EbpfError::NoCgroupV2(
            "no cgroup2 filesystem is mounted".into(),
        ));
    }
    let dir = PathBuf::from(PRIVATE_MOUNT);
    std::fs::create_dir_all(&dir).map_err(|source| EbpfError::Cgroup {
        path: dir.clone(),
        what: "creating a mount point",
        source,
    })?;
    let target = std::ffi::CString::new(PRIVATE_MOUNT)
        .map_err(|e| EbpfError::NoCgroupV2(format!("mount point {PRIVATE_MOUNT}: {e}")))?;
    let fstype = c"cgroup2";
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.kind() == io::ErrorKind::PermissionDenied {
            EbpfError::NoPrivileges(format!(
                "no cgroup2 filesystem is mounted and mounting one at {PRIVATE_MOUNT} failed ({e})"
            ))
        } else {
            EbpfError::NoCgroupV2(format!(
                "no cgroup2 filesystem is mounted and mounting one at {PRIVATE_MOUNT} failed ({e})"
            ))
        });
    }
    tracing::debug!(
        mount = PRIVATE_MOUNT,
        "mounted cgroup2 in this private mount namespace"
    );
    Ok((dir, "/".to_string()))
}

/// The `0::PATH` entry of /proc/PID/cgroup.
fn unified_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_string())
}

/// Mount point and mounted root of the first cgroup2 filesystem in /proc/PID/mountinfo.
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let root = unescape(fields.get(3)?);
        let point = unescape(fields.get(4)?);
        Some((PathBuf::from(point), root))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        if let Some(v) = octal {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `rel` (relative to the cgroup namespace's root) when the cgroup2
/// filesystem's `root` is mounted at `mount_point`.
fn resolve(mount_point: &Path, root: &str, rel: &str) -> Option<PathBuf> {
    let rel = rel.trim_start_matches('/');
    let root = root.trim_start_matches('/').trim_end_matches('/');
    let inside = if root.is_empty() {
        rel
    } else if rel == root {
        ""
    } else {
        rel.strip_prefix(root)?.strip_prefix('/')?
    };
    if inside.split('/').any(|c| c == "..") {
        return None;
    }
    Some(if inside.is_empty() {
        mount_point.to_path_buf()
    } else {
        mount_point.join(inside)
    })
}

/// The kernel's root cgroup lacks the files that exist only on non-root cgroups; a
/// container's namespace root is a real, non-root cgroup and has them.
fn is_machine_root(dir: &Path) -> bool {
    !dir.join("cgroup.type").exists() && !dir.join("cgroup.events").exists()
}

/// Moves process `pid` (all its threads) into cgroup `dir`.
fn join(dir: &Path, pid: u32) -> Result<(), EbpfError> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            EbpfError::NoPrivileges(format!("cannot write {} ({source})", procs.display()))
        } else {
            EbpfError::Cgroup {
                path: procs,
                what: "joining",
                source,
            }
        }
    })
}

/// Removes `spegel-<pid>` children left by daemons that exited without [`CgroupPlacement::release`]
/// (a cgroup with live processes cannot be removed, so this never disturbs a running one).
fn remove_stale_children(dir: &Path, own_pid: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("spegel-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != own_pid && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_line_is_found_among_v1_lines() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/kubepods/pod1/abc\n";
        assert_eq!(unified_path(text).as_deref(), Some("/kubepods/pod1/abc"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn cgroup2_mount_is_parsed_from_mountinfo() {
        let text = "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(text),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()))
        );
        assert_eq!(
            cgroup2_mount("30 25 0:26 / /x rw - ext4 /dev/sda rw\n"),
            None
        );
        let escaped = "41 31 0:38 /a\\040b /mnt/c\\040g rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(escaped),
            Some((PathBuf::from("/mnt/c g"), "/a b".to_string()))
        );
    }

    #[test]
    fn paths_resolve_against_the_mounted_root() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(m, "/", "/"), Some(m.to_path_buf()));
        assert_eq!(resolve(m, "/", "/a/b"), Some(m.join("a/b")));
        assert_eq!(resolve(m, "/a", "/a/b"), Some(m.join("b")));
        assert_eq!(resolve(m, "/a", "/a"), Some(m.to_path_buf()));
        assert_eq!(resolve(m, "/a", "/ab"), None);
        assert_eq!(resolve(m, "/a", "/c"), None);
        assert_eq!(resolve(m, "/", "/../x"), None);
    }

    #[test]
    fn only_children_of_exited_daemons_are_removed() {
        let dir = std::env::temp_dir().join(format!("spegel-ebpf-stale-{}", std::process::id()));
        let own = std::process::id();
        // PIDs never exceed 2^22 on Linux, so this one cannot be alive.
        for name in [
            format!("spegel-{own}"),
            "spegel-99999999".into(),
            "spegel-x".into(),
            "other".into(),
        ] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
        }
        remove_stale_children(&dir, own);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "other".to_string(),
                format!("spegel-{own}"),
                "spegel-x".into()
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_is_told_from_a_child_by_its_files() {
        let dir = std::env::temp_dir().join(format!("spegel-ebpf-root-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(is_machine_root(&dir));
        std::fs::write(dir.join("cgroup.type"), "domain\n").unwrap();
        assert!(!is_machine_root(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
