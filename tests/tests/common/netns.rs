//! A multi-host test bed on one machine: every "host" is a network namespace of its own with
//! an address on a private subnet, plugged by a veth pair into a bridge that lives in one more
//! namespace (the "switch"), and its processes run in a UTS namespace of their own whose
//! hostname is the host's name, so everything that tells hosts apart (the ring's shared-memory
//! grouping, the coordinator's workers-per-host count) sees different machines.
//!
//! ```text
//!   host "a" (netns)           switch (netns)            host "b" (netns)
//!   eth0 10.77.0.11 ──veth── h1 ─┐ br0 ┌─ h2 ──veth── eth0 10.77.0.12
//! ```
//!
//! A host's link can be capped (`tc qdisc … tbf`, in both directions: the host's egress on its
//! `eth0`, its ingress as the switch port's egress) and cut (`ip link set … down` on the switch
//! port, which drops packets silently, as a pulled cable or a partitioned network does; TCP
//! peers only notice at their timeouts). The kernel has no netem, so no delay or loss.
//!
//! Everything a bed creates is named `gantry-<pid>-<bed>-…` and removed when it drops (a test
//! that passes or panics); beds left behind by a test process that was killed are removed by
//! the next one, once their pid is gone. The subnet is the same in every bed: each bed's
//! switch is its own namespace, so beds of parallel tests cannot see each other.
//!
//! Creating namespaces needs root and iproute2 (`ip`, `tc`) and util-linux's `unshare`:
//! [`TestBed::new`] returns `None` with the reason printed where they are missing, and tests
//! skip. CI has them (`.ci/run` installs iproute2 when absent).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

const PREFIX: &str = "gantry-";

/// One machine of the bed.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its hostname, and the name tests use for it.
    pub name: String,
    /// Its network namespace.
    pub namespace: String,
    /// Its address on the bed's subnet (10.77.0.0/24).
    pub ip: Ipv4Addr,
    /// Its port on the switch (an interface in the switch namespace).
    port: String,
}

/// A set of hosts on one switch; see the module docs.
#[derive(Debug)]
pub struct TestBed {
    switch: String,
    hosts: Vec<Host>,
}

/// Runs `ip`/`tc` with `args`; `Err` carries the command and its stderr.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(program: &str, args: &[&str]) {
    if let Err(e) = sh(program, args) {
        panic!("test bed: {e}");
    }
}

/// Why this machine cannot hold a bed, if it cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating network namespaces needs root".into());
    }
    for (tool, args) in [
        ("ip", ["-V"].as_slice()),
        ("tc", ["-V"].as_slice()),
        ("unshare", ["--version"].as_slice()),
    ] {
        if let Err(e) = sh(tool, args) {
            return Some(format!(
                "{tool} is missing ({e}); install iproute2 and util-linux"
            ));
        }
    }
    None
}

/// Removes namespaces of earlier beds whose test process no longer runs.
fn remove_stale_beds() {
    let Ok(listing) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&listing.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

impl TestBed {
    /// A switch and one host per name, addresses 10.77.0.11, .12, … in order. `None` (with
    /// the reason printed) where the machine cannot make namespaces; panics if it can but
    /// setting one up fails.
    pub fn new(names: &[&str]) -> Option<Self> {
        if let Some(reason) = missing_prerequisite() {
            eprintln!("skipped: no multi-host test bed here: {reason}");
            return None;
        }
        remove_stale_beds();
        static BEDS: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            BEDS.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{id}-switch");
        if let Err(e) = sh("ip", &["netns", "add", &switch]) {
            eprintln!("skipped: no multi-host test bed here: {e}");
            return None;
        }
        // From here on, Drop removes whatever was made, also when a step below panics.
        let mut bed = TestBed {
            switch,
            hosts: Vec::new(),
        };
        must(
            "ip",
            &["-n", &bed.switch, "link", "add", "br0", "type", "bridge"],
        );
        must("ip", &["-n", &bed.switch, "link", "set", "br0", "up"]);
        for (index, name) in names.iter().enumerate() {
            let host = Host {
                name: (*name).to_owned(),
                namespace: format!("{id}-{name}"),
                ip: Ipv4Addr::new(10, 77, 0, 11 + u8::try_from(index).expect("few hosts")),
                port: format!("h{index}"),
            };
            must("ip", &["netns", "add", &host.namespace]);
            bed.hosts.push(host.clone());
            let (ns, sw, port) = (&host.namespace, &bed.switch, &host.port);
            must(
                "ip",
                &[
                    "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns",
                    sw,
                ],
            );
            must("ip", &["-n", sw, "link", "set", port, "master", "br0"]);
            must("ip", &["-n", sw, "link", "set", port, "up"]);
            let cidr = format!("{}/24", host.ip);
            must("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
            must("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            // Loopback too: a process's own HTTP endpoints listen on 127.0.0.1.
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(bed)
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("the test bed has no host {name:?}"))
    }

    /// `program` run on `host`: in its network namespace and in a UTS namespace of its own
    /// named after it. Each wrapper (`ip netns exec`, `unshare`, `sh -c exec`) execs the next,
    /// so the child's pid is `program`'s and signals reach it directly.
    pub fn command(&self, host: &str, program: &Path) -> Command {
        let host = self.host(host);
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &host.namespace,
                "unshare",
                "--uts",
                "sh",
                "-c",
            ])
            .arg(r#"hostname "$0" && exec "$@""#)
            .arg(&host.name)
            .arg(program);
        command
    }

    /// Caps `host`'s link at `rate` (tc's syntax: "1gbit", "10gbit") in both directions.
    pub fn cap(&self, host: &str, rate: &str) {
        let host = self.host(host);
        // A burst of a few milliseconds at the rate (never under 64 KiB): smaller bursts cost
        // throughput at these rates, larger ones let the first bytes of a transfer pass
        // uncapped.
        let bits = parse_rate(rate);
        let burst = (bits / 8 / 250).max(64 << 10).to_string();
        for (ns, dev) in [
            (&host.namespace, "eth0"),
            (&self.switch, host.port.as_str()),
        ] {
            must(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", &burst, "latency", "50ms",
                ],
            );
        }
    }

    /// Cuts `host`'s link: its packets are dropped, nobody is told.
    pub fn cut(&self, host: &str) {
        let host = self.host(host);
        must(
            "ip",
            &["-n", &self.switch, "link", "set", &host.port, "down"],
        );
    }

    /// Plugs `host`'s link back in.
    pub fn restore(&self, host: &str) {
        let host = self.host(host);
        must("ip", &["-n", &self.switch, "link", "set", &host.port, "up"]);
    }
}

/// Bits per second of a tc rate such as "1gbit", "500mbit", "10gbit".
fn parse_rate(rate: &str) -> u64 {
    let lower = rate.to_ascii_lowercase();
    for (suffix, scale) in [
        ("gbit", 1_000_000_000),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
    ] {
        if let Some(number) = lower.strip_suffix(suffix) {
            return number.parse::<u64>().expect("a whole number rate") * scale;
        }
    }
    panic!("rate {rate:?}: expected <n>gbit, <n>mbit or <n>kbit")
}

impl Drop for TestBed {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (a veth goes with either end).
        for host in &self.hosts {
            let _ = sh("ip", &["netns", "del", &host.namespace]);
        }
        let _ = sh("ip", &["netns", "del", &self.switch]);
    }
}
