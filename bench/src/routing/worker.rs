//! Worker processes of `bench routing`: `bench routing-worker` hosts a share of the routers
//! ([`LocalRouters`]) and obeys the coordinator, one JSON [`Request`] per line on stdin, one
//! JSON [`Response`] per line on stdout (logs go to stderr). [`Worker`] is the coordinator's
//! end: it spawns the process and makes bounded calls.
//!
//! Every request carries an ID that its reply echoes: a reply that arrives after its call
//! timed out is recognised and skipped instead of answering the next call.

use std::{process::Stdio, time::Duration};

use anyhow::Context;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    process::{Child, ChildStdin, ChildStdout},
    sync::Mutex,
    time::Instant,
};

use super::{
    Lookup,
    host::{HostStats, LocalRouters, LookupJob, StartSpec},
};

/// Longest line either side accepts (a lookup batch of 300 nodes is well under 1 MiB).
const MAX_LINE: usize = 64 << 20;
/// A worker with no command for this long assumes its coordinator is gone.
const IDLE_LIMIT: Duration = Duration::from_secs(1800);
/// Commands one worker serves at most (a full run sends a few thousand).
const MAX_COMMANDS: usize = 10_000_000;
/// Late replies (to calls that timed out) skipped while waiting for the current one.
const MAX_STALE_REPLIES: usize = 1000;

/// What the coordinator asks a worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Start a router and advertise its keys: [`Reply::Started`].
    Start(StartSpec),
    /// Advertise more keys on a router: [`Reply::Done`].
    Advertise {
        /// Node number.
        node: usize,
        /// Keys.
        keys: Vec<String>,
    },
    /// Withdraw keys on a router: [`Reply::Done`].
    Withdraw {
        /// Node number.
        node: usize,
        /// Keys.
        keys: Vec<String>,
    },
    /// Graceful shutdown of a router: [`Reply::Done`].
    Leave {
        /// Node number.
        node: usize,
    },
    /// Abort a router's task (its sockets close without a word): [`Reply::Done`].
    Crash {
        /// Node number.
        node: usize,
    },
    /// Run lookups concurrently, at most `parallel` in flight: [`Reply::Lookups`].
    Lookups {
        /// The lookups.
        jobs: Vec<LookupJob>,
        /// Lookups in flight at most.
        parallel: usize,
    },
    /// Process resource use and summed router counters: [`Reply::Stats`].
    Stats,
    /// Whether every router is ready: [`Reply::Ready`].
    Ready,
    /// Stop every router and exit: [`Reply::Done`].
    Shutdown,
}

/// A worker's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The router runs.
    Started {
        /// Its peer ID.
        peer_id: String,
        /// Its listen multiaddr (without `/p2p`).
        addr: String,
    },
    /// The command completed.
    Done,
    /// One result per job, in job order.
    Lookups {
        /// The results.
        results: Vec<Lookup>,
    },
    /// Resource use and counters.
    Stats(HostStats),
    /// Readiness of every router.
    Ready {
        /// All ready (true with no routers).
        ready: bool,
    },
    /// The command failed or could not be read.
    Error {
        /// Why.
        message: String,
    },
}

/// One line from the coordinator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// Echoed by the reply.
    pub id: u64,
    /// What to do.
    #[serde(flatten)]
    pub command: Command,
}

/// One line from a worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    /// The request's ID; none when the line had no readable ID.
    pub id: Option<u64>,
    /// The answer.
    #[serde(flatten)]
    pub reply: Reply,
}

enum LineRead {
    Line(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one line (without its newline). Bytes read so far stay in `buf` if the future is
/// dropped (tokio's `read_until` is cancel safe), so a timed-out read resumes mid-line. A line
/// over `max` bytes is discarded up to its newline.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    let room = (max + 1).saturating_sub(buf.len()) as u64;
    (&mut *reader).take(room).read_until(b'\n', buf).await?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(LineRead::Line(std::mem::take(buf)));
    }
    if buf.len() > max {
        buf.clear();
        // Bounded: every round consumes input, and at most this much of it.
        let mut left = 1u64 << 40;
        while left > 0 {
            let chunk = reader.fill_buf().await?;
            if chunk.is_empty() {
                break;
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    reader.consume(p + 1);
                    break;
                }
                None => {
                    let n = chunk.len();
                    reader.consume(n);
                    left = left.saturating_sub(n as u64);
                }
            }
        }
        return Ok(LineRead::TooLong);
    }
    if buf.is_empty() {
        return Ok(LineRead::Eof);
    }
    // End of input in the middle of a line: hand out what came.
    Ok(LineRead::Line(std::mem::take(buf)))
}

/// Answers one request line; the flag says the worker is to stop.
pub async fn respond(routers: &mut LocalRouters, line: &[u8]) -> (Response, bool) {
    let request = match serde_json::from_slice::<Request>(line) {
        Ok(r) => r,
        Err(e) => {
            // Echo the ID when one is readable, so the caller gets its error at once.
            let id = serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id")?.as_u64());
            let reply = Reply::Error {
                message: format!("bad request: {e}"),
            };
            return (Response { id, reply }, false);
        }
    };
    let stop = request.command == Command::Shutdown;
    let result = match request.command {
        Command::Start(spec) => routers
            .start(&spec)
            .await
            .map(|(peer_id, addr)| Reply::Started { peer_id, addr }),
        Command::Advertise { node, keys } => {
            routers.advertise(node, keys).await.map(|()| Reply::Done)
        }
        Command::Withdraw { node, keys } => {
            routers.withdraw(node, keys).await.map(|()| Reply::Done)
        }
        Command::Leave { node } => routers.leave(node).await.map(|()| Reply::Done),
        Command::Crash { node } => routers.crash(node).map(|()| Reply::Done),
        Command::Lookups { jobs, parallel } => routers
            .lookups(jobs, parallel)
            .await
            .map(|results| Reply::Lookups { results }),
        Command::Stats => Ok(Reply::Stats(routers.stats())),
        Command::Ready => Ok(Reply::Ready {
            ready: routers.ready(),
        }),
        Command::Shutdown => {
            routers.abort_all();
            Ok(Reply::Done)
        }
    };
    let reply = result.unwrap_or_else(|e| Reply::Error {
        message: format!("{e:#}"),
    });
    (
        Response {
            id: Some(request.id),
            reply,
        },
        stop,
    )
}

/// The worker's loop: requests from `input`, responses to `output`, until `shutdown`, end of
/// input or [`IDLE_LIMIT`] without a request.
pub async fn serve<R, W>(input: R, output: W) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    serve_with(input, output, IDLE_LIMIT, MAX_LINE).await
}

/// [`serve`] on this process's stdin and stdout. Pipes (as the coordinator gives) are read
/// and written through the reactor: tokio's `stdin()` would park a blocking thread in `read`
/// that outlives the loop (and needs a tokio feature the workspace lacks). Anything else (a
/// file, by hand) goes through tokio's file wrapper.
pub async fn serve_stdio() -> anyhow::Result<()> {
    use std::os::fd::AsFd as _;
    use tokio::net::unix::pipe;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let input: Box<dyn AsyncRead + Unpin> = match is_fifo(&stdin) {
        true => Box::new(pipe::Receiver::from_owned_fd(stdin)?),
        false => Box::new(tokio::fs::File::from_std(std::fs::File::from(stdin))),
    };
    let output: Box<dyn AsyncWrite + Unpin> = match is_fifo(&stdout) {
        true => Box::new(pipe::Sender::from_owned_fd(stdout)?),
        false => Box::new(tokio::fs::File::from_std(std::fs::File::from(stdout))),
    };
    serve(input, output).await
}

fn is_fifo(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::unix::fs::FileTypeExt as _;
    fd.try_clone()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.file_type().is_fifo())
}

async fn serve_with<R, W>(
    input: R,
    mut output: W,
    idle: Duration,
    max_line: usize,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut input = tokio::io::BufReader::new(input);
    let mut routers = LocalRouters::default();
    let mut buf = vec![];
    for _ in 0..MAX_COMMANDS {
        let read = match tokio::time::timeout(idle, read_line(&mut input, &mut buf, max_line)).await
        {
            Ok(read) => read.context("reading a request")?,
            Err(_) => {
                eprintln!("routing worker: no request in {idle:?}, stopping");
                break;
            }
        };
        let (response, stop) = match read {
            LineRead::Eof => break,
            LineRead::TooLong => (
                Response {
                    id: None,
                    reply: Reply::Error {
                        message: format!("request over {max_line} bytes"),
                    },
                },
                false,
            ),
            LineRead::Line(line) => respond(&mut routers, &line).await,
        };
        let mut line = serde_json::to_vec(&response)?;
        line.push(b'\n');
        tokio::time::timeout(idle, async {
            output.write_all(&line).await?;
            output.flush().await
        })
        .await
        .context("coordinator not reading replies")?
        .context("writing a reply")?;
        if stop {
            break;
        }
    }
    routers.abort_all();
    Ok(())
}

struct Pipe {
    stdin: ChildStdin,
    stdout: tokio::io::BufReader<ChildStdout>,
    /// A reply line read in part when a call timed out.
    partial: Vec<u8>,
    next_id: u64,
    /// A request may have been written in part: nothing sent after it would parse.
    broken: bool,
}

/// The coordinator's end of one worker process (`bench routing-worker`, this executable).
pub struct Worker {
    index: usize,
    pid: Option<u32>,
    child: Mutex<Option<Child>>,
    pipe: Mutex<Pipe>,
}

impl Worker {
    /// Starts worker `index` (this executable, which must be `bench`); the process is killed
    /// when the handle is dropped. Needs a tokio runtime.
    pub fn spawn(index: usize) -> anyhow::Result<Worker> {
        tokio::runtime::Handle::try_current().context("routing workers need a tokio runtime")?;
        let exe = std::env::current_exe().context("own executable")?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["routing-worker", "--index", &index.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting routing worker {index}: {}", exe.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        Ok(Worker {
            index,
            pid: child.id(),
            child: Mutex::new(Some(child)),
            pipe: Mutex::new(Pipe {
                stdin,
                stdout: tokio::io::BufReader::new(stdout),
                partial: vec![],
                next_id: 0,
                broken: false,
            }),
        })
    }

    /// Sends `command` and waits (at most `limit`, queueing behind other calls included) for
    /// its reply; an error reply is an error.
    pub async fn call(&self, command: Command, limit: Duration) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + limit;
        let who = || format!("routing worker {} (pid {:?})", self.index, self.pid);
        let mut pipe = tokio::time::timeout_at(deadline, self.pipe.lock())
            .await
            .with_context(|| format!("{}: busy for {limit:?}", who()))?;
        anyhow::ensure!(!pipe.broken, "{}: pipe broken by an earlier call", who());
        pipe.next_id += 1;
        let id = pipe.next_id;
        let mut line = serde_json::to_vec(&Request { id, command })?;
        line.push(b'\n');
        let written = tokio::time::timeout_at(deadline, async {
            pipe.stdin.write_all(&line).await?;
            pipe.stdin.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            pipe.broken = true;
            anyhow::bail!("{}: cannot send a request ({written:?})", who());
        }
        let pipe = &mut *pipe;
        for _ in 0..MAX_STALE_REPLIES {
            let read = tokio::time::timeout_at(
                deadline,
                read_line(&mut pipe.stdout, &mut pipe.partial, MAX_LINE),
            )
            .await
            .with_context(|| format!("{}: no reply in {limit:?}", who()))?
            .with_context(|| format!("{}: reading a reply", who()))?;
            let line = match read {
                LineRead::Line(line) => line,
                LineRead::TooLong => anyhow::bail!("{}: reply over {MAX_LINE} bytes", who()),
                LineRead::Eof => {
                    pipe.broken = true;
                    anyhow::bail!("{}: exited", who());
                }
            };
            let response: Response = serde_json::from_slice(&line)
                .with_context(|| format!("{}: unreadable reply", who()))?;
            match response {
                Response {
                    id: Some(got),
                    reply,
                } if got == id => {
                    return match reply {
                        Reply::Error { message } => Err(anyhow::anyhow!("{}: {message}", who())),
                        reply => Ok(reply),
                    };
                }
                // A request of ours it could not read: only this one can be unanswered.
                Response {
                    id: None,
                    reply: Reply::Error { message },
                } => anyhow::bail!("{}: {message}", who()),
                // The late reply to a call that timed out.
                _ => continue,
            }
        }
        anyhow::bail!("{}: {MAX_STALE_REPLIES} stale replies", who())
    }

    /// [`Worker::call`] for commands answered [`Reply::Done`].
    pub async fn call_done(&self, command: Command, limit: Duration) -> anyhow::Result<()> {
        match self.call(command, limit).await? {
            Reply::Done => Ok(()),
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }

    /// Asks the worker to stop, waits a little for it to exit, then kills it.
    pub async fn stop(&self) {
        if let Err(e) = self
            .call_done(Command::Shutdown, Duration::from_secs(10))
            .await
        {
            eprintln!("{e:#}");
        }
        let Some(mut child) = self.child.lock().await.take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spegel::routing::RouterStats;

    fn spec(node: usize, seeds: Vec<String>, keys: Vec<String>) -> StartSpec {
        StartSpec {
            node,
            // A range the benchmark's node numbers do not reach in a test.
            listen: format!("127.77.200.{}:{}", node + 1, 24000 + node),
            ttl: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            seeds,
            keys,
        }
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        let job = LookupJob {
            node: 3,
            key: "sha256:00".into(),
            count: 2,
        };
        let commands = vec![
            Command::Start(spec(
                1,
                vec!["/ip4/127.0.0.1/tcp/1".into()],
                vec!["k".into()],
            )),
            Command::Advertise {
                node: 1,
                keys: vec!["a".into()],
            },
            Command::Withdraw {
                node: 1,
                keys: vec!["a".into()],
            },
            Command::Leave { node: 2 },
            Command::Crash { node: 3 },
            Command::Lookups {
                jobs: vec![job.clone(), job],
                parallel: 4,
            },
            Command::Stats,
            Command::Ready,
            Command::Shutdown,
        ];
        for (id, command) in commands.into_iter().enumerate() {
            let r = Request {
                id: id as u64,
                command,
            };
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'), "one line: {line}");
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r, "{line}");
        }
        let replies = vec![
            Reply::Started {
                peer_id: "12D3".into(),
                addr: "/ip4/127.77.0.1/tcp/5".into(),
            },
            Reply::Done,
            Reply::Lookups {
                results: vec![
                    Lookup {
                        providers: vec!["a".into(), "b".into()],
                        first: Some(Duration::from_micros(1500)),
                        closed: Duration::from_millis(20),
                    },
                    Lookup {
                        providers: vec![],
                        first: None,
                        closed: Duration::from_secs(10),
                    },
                ],
            },
            Reply::Stats(HostStats {
                rss_kib: 1024.0,
                cpu_s: 1.5,
                routers: 2,
                counters: RouterStats {
                    kad_requests: 7,
                    notices: 1,
                    local_answers: 2,
                    dht_queries: 3,
                    unprovided: 4,
                },
                unprovided_by_node: vec![(5, 4)],
            }),
            Reply::Ready { ready: true },
            Reply::Error {
                message: "no".into(),
            },
        ];
        for (id, reply) in replies.into_iter().enumerate() {
            for id in [Some(id as u64), None] {
                let r = Response {
                    id,
                    reply: reply.clone(),
                };
                let line = serde_json::to_string(&r).unwrap();
                assert_eq!(
                    serde_json::from_str::<Response>(&line).unwrap(),
                    r,
                    "{line}"
                );
            }
        }
    }

    #[tokio::test]
    async fn malformed_requests_get_error_replies() {
        let mut routers = LocalRouters::default();
        let cases: Vec<(&[u8], Option<u64>)> = vec![
            (b"", None),
            (b"not json", None),
            (b"\xff\xfe{", None),
            (b"[1,2]", None),
            (br#"{"cmd":"stats"}"#, None),
            (br#"{"id":-1,"cmd":"stats"}"#, None),
            (br#"{"id":7,"cmd":"dance"}"#, Some(7)),
            (br#"{"id":8}"#, Some(8)),
            (br#"{"id":9,"cmd":"leave"}"#, Some(9)),
            (br#"{"id":10,"cmd":"leave","node":"x"}"#, Some(10)),
            (br#"{"id":11,"cmd":"leave","node":99}"#, Some(11)),
            (br#"{"id":12,"cmd":"crash","node":99}"#, Some(12)),
            (br#"{"id":13,"cmd":"advertise","node":99,"keys":["a"]}"#, Some(13)),
            (
                br#"{"id":14,"cmd":"lookups","jobs":[{"node":99,"key":"k","count":1}],"parallel":2}"#,
                Some(14),
            ),
            (
                br#"{"id":15,"cmd":"start","node":0,"listen":"nowhere","ttl":{"secs":1,"nanos":0},"idle_timeout":{"secs":1,"nanos":0},"seeds":[],"keys":[]}"#,
                Some(15),
            ),
            (
                br#"{"id":16,"cmd":"start","node":0,"listen":"127.77.200.1:24000","ttl":{"secs":1,"nanos":0},"idle_timeout":{"secs":1,"nanos":0},"seeds":["not a multiaddr"],"keys":[]}"#,
                Some(16),
            ),
        ];
        for (line, id) in cases {
            let (r, stop) = respond(&mut routers, line).await;
            assert!(!stop);
            assert_eq!(r.id, id, "{}", String::from_utf8_lossy(line));
            assert!(
                matches!(r.reply, Reply::Error { .. }),
                "{}: {r:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Nothing started; an empty host is ready and reports no routers.
        let (r, _) = respond(&mut routers, br#"{"id":1,"cmd":"ready"}"#).await;
        assert_eq!(r.reply, Reply::Ready { ready: true });
        let (r, _) = respond(&mut routers, br#"{"id":2,"cmd":"stats"}"#).await;
        assert!(matches!(
            r.reply,
            Reply::Stats(HostStats { routers: 0, .. })
        ));
    }

    #[tokio::test]
    async fn serve_answers_every_line_and_stops_on_shutdown() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (server_in, server_out) = tokio::io::split(server);
        let worker = tokio::spawn(serve_with(
            server_in,
            server_out,
            Duration::from_secs(10),
            100,
        ));
        let long = format!(
            "{{\"id\":1,\"cmd\":\"stats\",\"pad\":\"{}\"}}",
            "x".repeat(200)
        );
        let input = format!(
            "garbage\n{long}\n{{\"id\":2,\"cmd\":\"ready\"}}\n{{\"id\":3,\"cmd\":\"shutdown\"}}\n{{\"id\":4,\"cmd\":\"ready\"}}\n"
        );
        client.write_all(input.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), worker)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let replies: Vec<Response> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(replies.len(), 4, "nothing after shutdown: {out}");
        assert!(matches!(
            replies[0],
            Response {
                id: None,
                reply: Reply::Error { .. }
            }
        ));
        assert!(matches!(
            &replies[1],
            Response { id: None, reply: Reply::Error { message } } if message.contains("over 100 bytes")
        ));
        assert_eq!(
            replies[2],
            Response {
                id: Some(2),
                reply: Reply::Ready { ready: true }
            }
        );
        assert_eq!(
            replies[3],
            Response {
                id: Some(3),
                reply: Reply::Done
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_routers_through_the_protocol() {
        let mut routers = LocalRouters::default();
        let call = async |routers: &mut LocalRouters, id: u64, command: Command| {
            let line = serde_json::to_vec(&Request { id, command }).unwrap();
            let (r, _) = respond(routers, &line).await;
            assert_eq!(r.id, Some(id));
            r.reply
        };
        let key = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";
        let Reply::Started { peer_id, addr } = call(
            &mut routers,
            1,
            Command::Start(spec(0, vec![], vec![key.into()])),
        )
        .await
        else {
            panic!("first router did not start");
        };
        let seed = format!("{addr}/p2p/{peer_id}");
        let reply = call(&mut routers, 2, Command::Start(spec(1, vec![seed], vec![]))).await;
        assert!(matches!(reply, Reply::Started { .. }), "{reply:?}");
        let again = call(&mut routers, 3, Command::Start(spec(1, vec![], vec![]))).await;
        assert!(matches!(again, Reply::Error { .. }), "node 1 twice");
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(&mut routers, 4, Command::Ready).await != (Reply::Ready { ready: true }) {
            assert!(Instant::now() < deadline, "not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lookup = Command::Lookups {
            jobs: vec![LookupJob {
                node: 1,
                key: key.into(),
                count: 1,
            }],
            parallel: 2,
        };
        loop {
            let Reply::Lookups { results } = call(&mut routers, 5, lookup.clone()).await else {
                panic!("lookups failed");
            };
            assert_eq!(results.len(), 1);
            if results[0].providers == vec![peer_id.clone()] {
                assert!(results[0].first.is_some());
                break;
            }
            assert!(Instant::now() < deadline, "key never found");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let Reply::Stats(s) = call(&mut routers, 6, Command::Stats).await else {
            panic!("stats failed");
        };
        assert_eq!(s.routers, 2);
        assert!(s.rss_kib > 0.0 && s.cpu_s > 0.0, "{s:?}");
        assert_eq!(
            call(&mut routers, 7, Command::Crash { node: 0 }).await,
            Reply::Done
        );
        assert_eq!(
            call(&mut routers, 8, Command::Leave { node: 1 }).await,
            Reply::Done
        );
        assert!(matches!(
            call(&mut routers, 9, Command::Leave { node: 1 }).await,
            Reply::Error { .. }
        ));
    }
}
