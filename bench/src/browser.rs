//! A headless Chromium (Debian's `chromium`) driven over the Chrome DevTools Protocol on a
//! pipe (`--remote-debugging-pipe`: NUL-terminated JSON on fds 3 and 4), so no WebSocket
//! client and no downloaded browser are needed. Started inside a network namespace it can
//! only reach the testbed.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    os::fd::{AsRawFd, OwnedFd},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use base64::Engine as _;
use serde_json::{Value, json};

/// Path of Debian's chromium launcher.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for one protocol reply.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running browser.
pub struct Browser {
    child: Option<Child>,
    to_browser: std::fs::File,
    from_browser: mpsc::Receiver<Value>,
    next_id: u64,
    /// Protocol events received so far, per session ID (`""` for the browser).
    events: HashMap<String, Vec<Value>>,
    _profile: tempfile::TempDir,
}

/// One tab, attached with a flat session.
#[derive(Debug, Clone)]
pub struct Page {
    /// CDP session ID.
    pub session: String,
    /// Target ID.
    pub target: String,
}

impl Browser {
    /// Starts chromium headless, inside `netns` when given, logging to `log`.
    pub fn launch(netns: Option<&str>, log: &Path) -> anyhow::Result<Browser> {
        crate::process::require(CHROMIUM, "chromium")?;
        let profile = tempfile::Builder::new()
            .prefix("spegel-chromium")
            .tempdir()?;
        let (our_read, their_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (their_read, our_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut cmd = crate::process::command_in(netns, CHROMIUM);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--metrics-recording-only",
            "--password-store=basic",
            "--window-size=1400,1000",
            "--remote-debugging-pipe",
        ]);
        cmd.arg(format!("--user-data-dir={}", profile.path().display()));
        cmd.arg("about:blank");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let (r, w) = (their_read.as_raw_fd(), their_write.as_raw_fd());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec. The pipe
        // ends are first copied above 10 so that dup2 onto 3 and 4 never aliases its source
        // (which would keep close-on-exec set).
        unsafe {
            cmd.pre_exec(move || {
                let hr = libc::fcntl(r, libc::F_DUPFD, 10);
                let hw = libc::fcntl(w, libc::F_DUPFD, 10);
                if hr < 0 || hw < 0 || libc::dup2(hr, 3) < 0 || libc::dup2(hw, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(hr);
                libc::close(hw);
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting chromium")?;
        drop(their_read);
        drop(their_write);
        let (tx, rx) = mpsc::channel();
        spawn_reader(our_read, tx);
        Ok(Browser {
            child: Some(child),
            to_browser: std::fs::File::from(our_write),
            from_browser: rx,
            next_id: 1,
            events: HashMap::new(),
            _profile: profile,
        })
    }

    /// Sends `method` (to `session`, or the browser) and waits for its result.
    pub fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .with_context(|| format!("sending {method}"))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = match self.from_browser.recv_timeout(left) {
                Ok(m) => m,
                Err(_) => bail!("no reply to {method} within {CALL_TIMEOUT:?}"),
            };
            if m.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = m.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(m.get("result").cloned().unwrap_or(Value::Null));
            }
            self.keep_event(m);
        }
    }

    fn keep_event(&mut self, m: Value) {
        if m.get("method").is_some() {
            let session = m
                .get("sessionId")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let list = self.events.entry(session).or_default();
            // Bounded: a test never needs more than the first events of a page.
            if list.len() < 100_000 {
                list.push(m);
            }
        }
    }

    /// Takes protocol events already received without waiting.
    fn drain(&mut self) {
        while let Ok(m) = self.from_browser.try_recv() {
            self.keep_event(m);
        }
    }

    /// Opens a new tab with network and page events enabled.
    pub fn new_page(&mut self) -> anyhow::Result<Page> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )?;
        let session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_string();
        for m in ["Page.enable", "Network.enable", "Runtime.enable"] {
            self.call(Some(&session), m, json!({}))?;
        }
        self.call(
            Some(&session),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )?;
        Ok(Page { session, target })
    }

    /// Navigates `page` to `url`.
    pub fn navigate(&mut self, page: &Page, url: &str) -> anyhow::Result<()> {
        let r = self.call(Some(&page.session), "Page.navigate", json!({"url": url}))?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {e}");
        }
        Ok(())
    }

    /// Evaluates `expression` in the page (awaiting promises) and returns its JSON value.
    pub fn eval(&mut self, page: &Page, expression: &str) -> anyhow::Result<Value> {
        let r = self.call(
            Some(&page.session),
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("evaluating {expression}: {e}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `expression` every 100 ms until it is truthy, at most `timeout`.
    pub fn wait_until(
        &mut self,
        page: &Page,
        expression: &str,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(page, expression).unwrap_or(Value::Null);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for `{expression}`");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Captures a PNG of the page's viewport.
    pub fn screenshot(&mut self, page: &Page) -> anyhow::Result<Vec<u8>> {
        let r = self.call(
            Some(&page.session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        )?;
        let data = r["data"].as_str().context("no screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }

    /// Variance of the grey level of `png`'s pixels, decoded by the browser itself
    /// (0 for a blank image).
    pub fn pixel_variance(&mut self, page: &Page, png: &[u8]) -> anyhow::Result<f64> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        let expr = format!(
            r#"(async () => {{
                const bin = atob("{b64}");
                const bytes = new Uint8Array(bin.length);
                for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
                const bmp = await createImageBitmap(new Blob([bytes], {{type: "image/png"}}));
                const c = new OffscreenCanvas(bmp.width, bmp.height);
                const ctx = c.getContext("2d");
                ctx.drawImage(bmp, 0, 0);
                const d = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
                let n = 0, sum = 0, sq = 0;
                for (let i = 0; i < d.length; i += 4) {{
                    const g = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
                    n++; sum += g; sq += g * g;
                }}
                const mean = sum / n;
                return sq / n - mean * mean;
            }})()"#
        );
        self.eval(page, &expr)?
            .as_f64()
            .context("variance is not a number")
    }

    /// URLs of every request the page's session has made so far.
    pub fn requests(&mut self, page: &Page) -> Vec<String> {
        self.drain();
        self.events
            .get(&page.session)
            .map(|evs| {
                evs.iter()
                    .filter(|e| e["method"] == "Network.requestWillBeSent")
                    .filter_map(|e| e["params"]["request"]["url"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Console messages and uncaught exceptions of the page so far.
    pub fn errors(&mut self, page: &Page) -> Vec<String> {
        self.drain();
        self.events
            .get(&page.session)
            .map(|evs| {
                evs.iter()
                    .filter(|e| {
                        e["method"] == "Runtime.exceptionThrown"
                            || (e["method"] == "Runtime.consoleAPICalled"
                                && e["params"]["type"] == "error")
                    })
                    .map(|e| e["params"].to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Closes the browser (politely, then by PID).
    pub fn close(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self
            .to_browser
            .write_all(b"{\"id\":999999999,\"method\":\"Browser.close\"}\0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.close();
    }
}

fn spawn_reader(fd: OwnedFd, tx: mpsc::Sender<Value>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(std::fs::File::from(fd));
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(0, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if buf.last() == Some(&0) {
                        buf.pop();
                    }
                    if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                        && tx.send(v).is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
}

/// Directory for test artifacts (screenshots): `<workspace>/target/ui-artifacts`.
pub fn artifacts_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let dir = root.join("target/ui-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
