//! Zero-copy blob bodies: `sendfile(2)` from the content file to a non-blocking tokio socket.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

/// Largest count handed to one `sendfile` call; the kernel caps a call near 2 GiB anyway.
const MAX_CHUNK: u64 = 1 << 30;

/// Sends `len` bytes of `file` from `offset` to `stream` without copying them through
/// userspace. A socket that accepts nothing for `stall` is given up on.
pub async fn sendfile_all(
    stream: &TcpStream,
    file: &std::fs::File,
    mut offset: u64,
    mut len: u64,
    stall: Duration,
) -> io::Result<()> {
    while len > 0 {
        tokio::time::timeout(stall, stream.writable())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))??;
        let count = len.min(MAX_CHUNK) as usize;
        let result = stream.try_io(Interest::WRITABLE, || {
            let mut off =
                i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
            nix::sys::sendfile::sendfile(stream.as_fd(), file.as_fd(), Some(&mut off), count)
                .map_err(io::Error::from)
        });
        match result {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "content file shorter than its descriptor",
                ));
            }
            Ok(n) => {
                offset += n as u64;
                len -= n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets or clears `TCP_CORK`, so a response head and its sendfile body leave in full packets.
pub fn set_cork(stream: &TcpStream, on: bool) -> io::Result<()> {
    let value: libc::c_int = on.into();
    // SAFETY: valid fd owned by `stream`, pointer and length describe a live c_int.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
