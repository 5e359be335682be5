//! containerd's writes in progress: the local content store keeps each one in
//! `<root>/ingest/<sha256 of ref>/` with `ref` (the writer's name, which names the digest for
//! pulls: `layer-sha256:<hex>`, `config-…`, `manifest-…`), `total` (expected size, written
//! before `data` when known), `data`, `startedat` and `updatedat`. containerd 1.6, 1.7 and 2.x
//! share this layout (the local store is the same code). A commit renames `data` to
//! `blobs/<alg>/<hex>` and removes the directory; an abort removes the directory.
//!
//! The ingest is found by polling the directory (a `readdir` and small reads, cheap next to a
//! pull); a body being served polls its file with `fstat`. A writer that added nothing for the
//! stall bound is treated as gone (its containerd or its client may have died, leaving the
//! directory behind): it is neither served nor advertised until it grows again.

use std::{
    collections::HashMap,
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use crate::{http::Growth, oci::Digest};

/// How often a growing body looks at its file when it has caught up with the writer.
pub const GROWTH_POLL: Duration = Duration::from_millis(5);
/// Default bound on a writer that adds nothing: the body is cut after this long, and an ingest
/// idle this long is no longer served or advertised. Short, because a cut costs little: the
/// requester resumes from another provider, or its containerd re-requests the rest by range and
/// falls back upstream.
pub const DEFAULT_STALL: Duration = Duration::from_secs(3);
/// Largest `ref` or `total` file read (containerd's are a few dozen bytes).
const MAX_SMALL_FILE: u64 = 4096;

/// One blob containerd is writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingest {
    /// The digest its ref names.
    pub digest: Digest,
    /// Expected size, when the writer declared one.
    pub total: Option<u64>,
    /// Bytes written so far.
    pub written: u64,
    /// Time since `data` was last written.
    pub idle: Duration,
}

/// The digest a writer ref names: the last `sha256:<64 hex>` in it.
pub fn digest_of_ref(reference: &str) -> Option<Digest> {
    const PREFIX: &str = "sha256:";
    let at = reference.rfind(PREFIX)?;
    let hex = reference.get(at + PREFIX.len()..at + PREFIX.len() + 64)?;
    format!("{PREFIX}{hex}").parse().ok()
}

fn read_small(path: &Path) -> Option<String> {
    use std::io::Read;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let mut text = String::new();
    file.take(MAX_SMALL_FILE).read_to_string(&mut text).ok()?;
    Some(text)
}

/// An ingest directory's digest, expected size and `data` path, if it names a digest and has
/// started writing.
fn inspect(dir: &Path) -> Option<(Ingest, PathBuf)> {
    let digest = digest_of_ref(read_small(&dir.join("ref"))?.trim())?;
    let data = dir.join("data");
    let meta = std::fs::symlink_metadata(&data).ok()?;
    if !meta.file_type().is_file() {
        return None;
    }
    let total = read_small(&dir.join("total")).and_then(|t| t.trim().parse::<u64>().ok());
    let idle = meta
        .modified()
        .ok()
        .and_then(|m| SystemTime::now().duration_since(m).ok())
        .unwrap_or_default();
    Some((
        Ingest {
            digest,
            total: total.filter(|t| *t > 0),
            written: meta.len(),
            idle,
        },
        data,
    ))
}

/// Every ingest under `root` that names a digest and has a `data` file; when several write
/// the same digest, the one furthest along.
pub fn scan(root: &Path) -> Vec<Ingest> {
    scan_paths(root).into_values().map(|(i, _)| i).collect()
}

fn scan_paths(root: &Path) -> HashMap<Digest, (Ingest, PathBuf)> {
    let mut out: HashMap<Digest, (Ingest, PathBuf)> = HashMap::new();
    let Ok(entries) = std::fs::read_dir(root.join("ingest")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Some((ingest, data)) = inspect(&entry.path()) else {
            continue;
        };
        match out.get(&ingest.digest) {
            Some((other, _)) if other.written >= ingest.written => {}
            _ => {
                out.insert(ingest.digest.clone(), (ingest, data));
            }
        }
    }
    out
}

/// A blob being written, opened for serving while it grows.
#[derive(Debug)]
pub struct GrowingFile {
    /// The open `data` file (after a commit: the committed blob, same inode).
    pub file: std::fs::File,
    /// The blob's final size.
    pub size: u64,
    /// Watches the writer.
    pub growth: IngestGrowth,
}

/// Opens the ingest writing `digest` under `root`, if there is one with a known size. `stall`
/// bounds how long a body waits for a writer that adds nothing.
pub fn open_growing(
    root: &Path,
    digest: &Digest,
    stall: Duration,
) -> io::Result<Option<GrowingFile>> {
    let Some((ingest, data)) = scan_paths(root).remove(digest) else {
        return Ok(None);
    };
    // Without the final size the Content-Length would be a guess: not served in progress.
    let Some(size) = ingest.total else {
        return Ok(None);
    };
    // A writer quiet for the stall bound may be dead: serving it would only stall the peer.
    if ingest.idle >= stall {
        return Ok(None);
    }
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&data)
    {
        Ok(f) => f,
        // Committed or aborted between the scan and the open.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Ok(None);
    }
    let blob = root
        .join("blobs")
        .join(digest.algorithm().as_str())
        .join(digest.hex());
    let growth = IngestGrowth {
        watch: file.try_clone()?,
        data,
        blob,
        size,
        id: (meta.dev(), meta.ino()),
        last_len: meta.len(),
        last_change: Instant::now(),
        stall,
        poll: GROWTH_POLL,
    };
    Ok(Some(GrowingFile { file, size, growth }))
}

/// What became of the writer of a file that stopped growing.
#[derive(Debug, PartialEq, Eq)]
enum Writer {
    /// Still the ingest's `data`.
    Writing,
    /// Renamed into `blobs/`: the file is the committed blob.
    Committed,
    /// The ingest was removed, or its `data` is another file now.
    Gone,
}

/// [`Growth`] of an ingest's `data` file: final up to its length (containerd writes it in
/// order), cut when the ingest is aborted, replaced or stalls.
#[derive(Debug)]
pub struct IngestGrowth {
    watch: std::fs::File,
    data: PathBuf,
    blob: PathBuf,
    size: u64,
    id: (u64, u64),
    last_len: u64,
    last_change: Instant,
    stall: Duration,
    poll: Duration,
}

impl IngestGrowth {
    fn is_ours(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }

    fn writer(&self) -> Writer {
        if self.is_ours(&self.data) {
            Writer::Writing
        } else if self.is_ours(&self.blob) {
            Writer::Committed
        } else {
            Writer::Gone
        }
    }
}

#[async_trait::async_trait]
impl Growth for IngestGrowth {
    async fn wait_beyond(&mut self, have: u64) -> io::Result<u64> {
        loop {
            let len = self.watch.metadata()?.len();
            if len > self.size {
                return Err(io::Error::other("ingest grew past its expected size"));
            }
            if len != self.last_len {
                // A shrink is containerd restarting the write from 0: the bytes it rewrites are
                // the same content, so the ones already sent stay right.
                self.last_len = len;
                self.last_change = Instant::now();
            }
            if len > have {
                return Ok(len);
            }
            match self.writer() {
                Writer::Writing => {}
                // containerd checks the size before it commits: a short committed file is not ours.
                Writer::Committed => {
                    return Err(io::Error::other("committed blob shorter than expected"));
                }
                Writer::Gone => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "ingest abandoned or replaced",
                    ));
                }
            }
            if self.last_change.elapsed() >= self.stall {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "ingest stalled"));
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Test helper: containerd's ingest layout, written by hand.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::io::Write;

    /// A fake content store laid out as containerd's local store writes it.
    pub struct FakeIngest {
        pub root: PathBuf,
        pub dir: PathBuf,
        pub data: std::fs::File,
        pub digest: Digest,
    }

    impl FakeIngest {
        pub fn start(root: &Path, content: &[u8], total: Option<u64>) -> FakeIngest {
            let digest = Digest::sha256_of(content);
            let reference = format!("layer-{digest}");
            let dir = root
                .join("ingest")
                .join(Digest::sha256_of(reference.as_bytes()).hex());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
            std::fs::write(dir.join("ref"), &reference).unwrap();
            if let Some(t) = total {
                std::fs::write(dir.join("total"), t.to_string()).unwrap();
            }
            let data = std::fs::File::create(dir.join("data")).unwrap();
            FakeIngest {
                root: root.to_path_buf(),
                dir,
                data,
                digest,
            }
        }

        pub fn write(&mut self, bytes: &[u8]) {
            self.data.write_all(bytes).unwrap();
        }

        pub fn commit(&self) {
            std::fs::rename(
                self.dir.join("data"),
                self.root.join("blobs/sha256").join(self.digest.hex()),
            )
            .unwrap();
            std::fs::remove_dir_all(&self.dir).unwrap();
        }

        pub fn abort(&self) {
            std::fs::remove_dir_all(&self.dir).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeIngest;
    use super::*;

    #[test]
    fn refs_name_their_digest() {
        let d = Digest::sha256_of(b"x");
        assert_eq!(digest_of_ref(&format!("layer-{d}")), Some(d.clone()));
        assert_eq!(digest_of_ref(&format!("config-{d}")), Some(d.clone()));
        assert_eq!(digest_of_ref("layer-sha256:abc"), None);
        assert_eq!(digest_of_ref("no digest"), None);
        assert_eq!(
            digest_of_ref(&format!("layer-{}", d.to_string().to_uppercase())),
            None
        );
    }

    #[test]
    fn scan_finds_started_writes_with_their_totals() {
        let dir = tempfile::tempdir().unwrap();
        assert!(scan(dir.path()).is_empty());
        let mut a = FakeIngest::start(dir.path(), b"aaaa", Some(4));
        a.write(b"aa");
        let b = FakeIngest::start(dir.path(), b"bbbb", None);
        // A directory without a ref naming a digest is some other writer.
        std::fs::create_dir_all(dir.path().join("ingest/other")).unwrap();
        std::fs::write(dir.path().join("ingest/other/ref"), "not-a-digest").unwrap();
        std::fs::write(dir.path().join("ingest/other/data"), "x").unwrap();
        let mut found = scan(dir.path());
        found.sort_by_key(|i| i.total);
        assert!(found.iter().all(|i| i.idle < DEFAULT_STALL));
        let found: Vec<_> = found
            .into_iter()
            .map(|i| (i.digest, i.total, i.written))
            .collect();
        assert_eq!(
            found,
            vec![(b.digest.clone(), None, 0), (a.digest.clone(), Some(4), 2),]
        );
        // Unknown size: never served in progress.
        assert!(
            open_growing(dir.path(), &b.digest, DEFAULT_STALL)
                .unwrap()
                .is_none()
        );
        a.commit();
        assert_eq!(scan(dir.path()).len(), 1);
    }

    #[tokio::test]
    async fn growth_follows_the_writer_through_commit() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"0123456789".to_vec();
        let mut ingest = FakeIngest::start(dir.path(), &content, Some(10));
        ingest.write(&content[..3]);
        let mut g = open_growing(dir.path(), &ingest.digest, DEFAULT_STALL)
            .unwrap()
            .unwrap();
        assert_eq!(g.size, 10);
        assert_eq!(g.growth.wait_beyond(0).await.unwrap(), 3);
        ingest.write(&content[3..7]);
        assert_eq!(g.growth.wait_beyond(3).await.unwrap(), 7);
        ingest.write(&content[7..]);
        ingest.commit();
        assert_eq!(g.growth.wait_beyond(7).await.unwrap(), 10);
        // After the commit the committed blob is the same file: nothing more to wait for, and
        // asking beyond the end is an error rather than a hang.
        assert!(g.growth.wait_beyond(10).await.is_err());
    }

    #[tokio::test]
    async fn abandoned_replaced_and_stalled_writes_cut() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"abcdef".to_vec();
        let mut ingest = FakeIngest::start(dir.path(), &content, Some(6));
        ingest.write(b"ab");
        let mut g = open_growing(dir.path(), &ingest.digest, DEFAULT_STALL)
            .unwrap()
            .unwrap();
        ingest.abort();
        let err = g.growth.wait_beyond(2).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut ingest = FakeIngest::start(dir.path(), &content, Some(6));
        ingest.write(b"ab");
        let mut g = open_growing(dir.path(), &ingest.digest, DEFAULT_STALL)
            .unwrap()
            .unwrap();
        // Replaced: the same ref starts over in a new directory with a new file.
        ingest.abort();
        let mut again = FakeIngest::start(dir.path(), &content, Some(6));
        again.write(b"abc");
        let err = g.growth.wait_beyond(2).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut g = open_growing(dir.path(), &again.digest, Duration::from_millis(30))
            .unwrap()
            .unwrap();
        assert_eq!(g.growth.wait_beyond(0).await.unwrap(), 3);
        let err = g.growth.wait_beyond(3).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // A file longer than its declared size is not that content.
        again.write(b"defg");
        assert!(g.growth.wait_beyond(3).await.is_err());
    }

    #[test]
    fn quiet_writers_are_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let mut ingest = FakeIngest::start(dir.path(), b"abcdef", Some(6));
        ingest.write(b"ab");
        // As if the last write was a minute ago (its containerd died since).
        let then = SystemTime::now() - Duration::from_secs(60);
        ingest.data.set_modified(then).unwrap();
        let found = scan(dir.path());
        assert_eq!(found.len(), 1);
        assert!(
            found[0].idle >= Duration::from_secs(59),
            "{:?}",
            found[0].idle
        );
        assert!(
            open_growing(dir.path(), &ingest.digest, DEFAULT_STALL)
                .unwrap()
                .is_none()
        );
        // Writing again makes it servable again.
        ingest.write(b"c");
        assert!(
            open_growing(dir.path(), &ingest.digest, DEFAULT_STALL)
                .unwrap()
                .is_some()
        );
    }
}
