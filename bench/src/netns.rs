//! Test hosts in network namespaces: a bridge in its own namespace, one namespace per node and
//! one for the upstream registry, all on 10.99.0.0/24. The root namespace is never touched
//! beyond creating the namespaces, and nothing is ever sent to 10.x from it.

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{
    delay::{DelayLink, LinkSpec, open_tap},
    images::in_netns,
};

/// Address of the upstream namespace.
pub const UPSTREAM_IP: &str = "10.99.0.254";

/// A set of namespaces joined by a bridge; deleted on drop, also when a test panics. Stop the
/// processes running inside first ([`crate::cluster::Cluster`] drops them before its network).
pub struct Network {
    prefix: String,
    namespaces: Vec<String>,
    addrs: Vec<String>,
    nodes: usize,
    /// Delayed links by node; stopped before the namespaces are deleted.
    links: Vec<(usize, DelayLink)>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Runs a command inside a namespace and returns whether it succeeded.
pub fn exec_ok(ns: &str, program: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Network {
    /// Creates a bridge namespace, `nodes` node namespaces (10.99.0.1…) and an upstream
    /// namespace (10.99.0.254), with names unique to this process.
    pub fn create(nodes: usize) -> anyhow::Result<Network> {
        Network::create_with(nodes, &[])
    }

    /// [`Network::create`] with some nodes' links delayed and/or rate-limited.
    pub fn create_with(nodes: usize, links: &[LinkSpec]) -> anyhow::Result<Network> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if nodes == 0 || nodes > 200 {
            bail!("between 1 and 200 nodes, not {nodes}");
        }
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("sp{}x{id}", std::process::id());
        let mut net = Network {
            prefix: prefix.clone(),
            namespaces: Vec::new(),
            addrs: Vec::new(),
            nodes,
            links: Vec::new(),
        };
        if let Some(bad) = links.iter().find(|l| l.node == 0 || l.node > nodes) {
            bail!("link spec for node {} of {nodes}", bad.node);
        }
        let hub = format!("{prefix}-hub");
        ip(&["netns", "add", &hub])?;
        net.namespaces.push(hub.clone());
        in_ns(&hub, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&hub, &["ip", "link", "set", "br0", "up"])?;
        in_ns(&hub, &["ip", "link", "set", "lo", "up"])?;
        let mut members: Vec<(String, String)> = (1..=nodes)
            .map(|k| (net.node(k), format!("10.99.0.{k}")))
            .collect();
        members.push((net.upstream(), UPSTREAM_IP.to_string()));
        for (ns, addr) in &members {
            net.attach(ns, addr)?;
        }
        for spec in links {
            net.delay_node(spec.node, spec.delay)?;
            if let Some(rate) = &spec.rate {
                net.shape(&net.node(spec.node), rate)?;
            }
        }
        Ok(net)
    }

    /// Creates namespace `ns` (deleted on drop) with `eth0` at `addr`/24 on the hub's bridge.
    /// Both veth ends are created directly inside their namespaces, so no interface ever
    /// appears in the root namespace and hub-side names only need to be unique in the hub.
    fn attach(&mut self, ns: &str, addr: &str) -> anyhow::Result<()> {
        let hub = self.hub();
        let hub_end = format!("h{}", self.namespaces.len());
        ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        self.addrs.push(addr.to_string());
        ip(&[
            "link", "add", &hub_end, "netns", &hub, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        ])?;
        in_ns(&hub, &["ip", "link", "set", &hub_end, "master", "br0"])?;
        in_ns(&hub, &["ip", "link", "set", &hub_end, "up"])?;
        in_ns(
            ns,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
        in_ns(ns, &["ip", "link", "set", "eth0", "up"])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])
    }

    /// Adds `delay` of round-trip time between node `k` and the bridge (see [`crate::delay`]).
    /// The first call replaces the node's veth with a delayed TAP link (same `eth0`, same
    /// address; call it before starting anything in the node, since its address is briefly
    /// gone); later calls just change the delay, at once, even with traffic flowing.
    pub fn delay_node(&mut self, k: usize, delay: Duration) -> anyhow::Result<()> {
        if k == 0 || k > self.nodes {
            bail!("node {k} does not exist (1..={})", self.nodes);
        }
        if let Some((_, link)) = self.links.iter().find(|(n, _)| *n == k) {
            link.set_delay(delay);
            return Ok(());
        }
        let ns = self.node(k);
        let hub = self.hub();
        let hub_end = format!("d{k}");
        // Deleting the node's end of the veth deletes the hub's end too.
        in_ns(&ns, &["ip", "link", "del", "eth0"])?;
        let node_tap = in_netns(&ns, || open_tap("eth0"))?;
        let name = hub_end.clone();
        let hub_tap = in_netns(&hub, move || open_tap(&name))?;
        // Deeper device queues than the default 1000: a slow read must not drop frames early.
        in_ns(
            &hub,
            &["ip", "link", "set", &hub_end, "txqueuelen", "10000"],
        )?;
        in_ns(&hub, &["ip", "link", "set", &hub_end, "master", "br0"])?;
        in_ns(&hub, &["ip", "link", "set", &hub_end, "up"])?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "txqueuelen", "10000"])?;
        let addr = format!("{}/24", self.node_ip(k));
        in_ns(&ns, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
        in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
        let link = DelayLink::start(node_tap, hub_tap, delay)?;
        self.links.push((k, link));
        Ok(())
    }

    /// The delayer of node `k`'s link, if it has one.
    pub fn link(&self, k: usize) -> Option<&DelayLink> {
        self.links.iter().find(|(n, _)| *n == k).map(|(_, l)| l)
    }

    /// Namespace of node `k` (1-based).
    pub fn node(&self, k: usize) -> String {
        format!("{}-n{k}", self.prefix)
    }

    /// IP of node `k`.
    pub fn node_ip(&self, k: usize) -> String {
        format!("10.99.0.{k}")
    }

    /// Namespace holding the bridge.
    pub fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// Prefix of every namespace name of this network (unique per process and network).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Namespace of the upstream registry.
    pub fn upstream(&self) -> String {
        format!("{}-up", self.prefix)
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Limits what namespace `ns` sends on its link, e.g. `400mbit`.
    pub fn shape(&self, ns: &str, rate: &str) -> anyhow::Result<()> {
        in_ns(
            ns,
            &[
                "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
                "256kb", "latency", "100ms",
            ],
        )
    }

    /// Removes a rate limit set by [`Network::shape`] (restores the default qdisc).
    pub fn unshape(&self, ns: &str) -> anyhow::Result<()> {
        unshape(ns)
    }

    /// Adds one more host namespace on the bridge with address `addr` (10.99.0.x, not a
    /// node's or the upstream's) and returns its name; `name` is a short suffix, e.g. `cache`.
    pub fn add_host(&mut self, name: &str, addr: &str) -> anyhow::Result<String> {
        let taken = self.addrs.iter().any(|a| a == addr);
        if taken || !addr.starts_with("10.99.0.") {
            bail!("address {addr} is taken or outside 10.99.0.0/24");
        }
        let ns = format!("{}-{name}", self.prefix);
        self.attach(&ns, addr)?;
        Ok(ns)
    }

    /// Limits the upstream's sending rate (what nodes download from it), e.g. `200mbit`.
    pub fn shape_upstream(&self, rate: &str) -> anyhow::Result<()> {
        in_ns(
            &self.upstream(),
            &[
                "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
                "256kb", "latency", "100ms",
            ],
        )
    }
}

/// Removes the root qdisc of `ns`'s `eth0` (undoes a `tbf` shape).
pub fn unshape(ns: &str) -> anyhow::Result<()> {
    in_ns(ns, &["tc", "qdisc", "del", "dev", "eth0", "root"])
}

/// Bytes namespace `ns` has sent on its `eth0` (the kernel's counter, read from inside it).
pub fn tx_bytes(ns: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "cat",
            "/sys/class/net/eth0/statistics/tx_bytes",
        ])
        .output()
        .context("reading tx_bytes")?;
    if !out.status.success() {
        bail!(
            "reading tx_bytes in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("tx_bytes of {ns} is not a number"))
}

impl Drop for Network {
    fn drop(&mut self) {
        self.links.clear();
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
