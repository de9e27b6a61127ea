//! Two hosts on one machine: network namespaces for the source and the destination joined by a
//! veth pair whose both ends are shaped with `tc tbf`, and a third namespace for clients, which
//! reaches the service address through whichever host holds it.
//!
//! ```text
//!   src (vsrc 198.18.0.1) ======= tbf ======= (vdst 198.18.0.2) dst
//!   vsc 198.18.1.1                                 vdc 198.18.2.1
//!        \                                         /
//!         vcs 198.18.1.2 ---- cli ---- vcd 198.18.2.2
//!   service address 198.18.0.100/32: on src's lo, later on dst's; cli routes it to its holder
//! ```
//!
//! 198.18.0.0/15 is the range set aside for benchmarking (RFC 2544), so it clashes with nothing.
//! Everything is removed in `Drop`: deleting a namespace deletes its veth ends.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub const SRC_ADDR: &str = "198.18.0.1";
pub const DST_ADDR: &str = "198.18.0.2";
pub const SERVICE_ADDR: &str = "198.18.0.100";
const SRC_LINK: &str = "vsrc";
const DST_LINK: &str = "vdst";
const CLI_VIA_SRC: &str = "198.18.1.1";
const CLI_VIA_DST: &str = "198.18.2.1";

/// Which of the three namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
    Clients,
}

#[derive(Debug)]
pub struct Testbed {
    names: [String; 3],
    created: Vec<String>,
}

impl Testbed {
    /// Creates the namespaces and links; `tag` keeps parallel runs apart (the harness's pid).
    pub fn create(tag: u32) -> Result<Testbed> {
        let mut bed = Testbed {
            names: [
                format!("ckb-src-{tag}"),
                format!("ckb-dst-{tag}"),
                format!("ckb-cli-{tag}"),
            ],
            created: Vec::new(),
        };
        for name in bed.names.clone() {
            ip(&["netns", "add", &name])?;
            bed.created.push(name);
        }
        let [src, dst, cli] = bed.names.clone();
        for (a, a_ns, b, b_ns) in [
            (SRC_LINK, &src, DST_LINK, &dst),
            ("vsc", &src, "vcs", &cli),
            ("vdc", &dst, "vcd", &cli),
        ] {
            ip(&[
                "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns,
            ])?;
        }
        for (ns, link, addr) in [
            (&src, SRC_LINK, "198.18.0.1/24"),
            (&dst, DST_LINK, "198.18.0.2/24"),
            (&src, "vsc", "198.18.1.1/24"),
            (&cli, "vcs", "198.18.1.2/24"),
            (&dst, "vdc", "198.18.2.1/24"),
            (&cli, "vcd", "198.18.2.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", link])?;
            ip(&["-n", ns, "link", "set", link, "up"])?;
        }
        for ns in [&src, &dst, &cli] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        bed.reset_service_address()?;
        Ok(bed)
    }

    pub fn name(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.names[0],
            Side::Destination => &self.names[1],
            Side::Clients => &self.names[2],
        }
    }

    /// The namespace file `nsenter --net=` and `setns` take.
    pub fn ns_path(&self, side: Side) -> PathBuf {
        PathBuf::from("/run/netns").join(self.name(side))
    }

    /// Limits both directions of the migration link to `mbit` Mbit/s, or lifts the limit.
    pub fn set_bandwidth(&self, mbit: Option<u32>) -> Result<()> {
        for (side, link) in [(Side::Source, SRC_LINK), (Side::Destination, DST_LINK)] {
            let ns = self.name(side);
            match mbit {
                Some(rate) => {
                    // tbf must hold at least one timer tick of traffic (HZ=250 here), or it
                    // cannot reach its rate; never less than a few full-size frames.
                    let burst = (u64::from(rate) * 1_000_000 / 8 / 250).max(16 * 1024);
                    let (rate, burst) = (format!("{rate}mbit"), burst.to_string());
                    tc(&[
                        "-n", ns, "qdisc", "replace", "dev", link, "root", "tbf", "rate", &rate,
                        "burst", &burst, "latency", "400ms",
                    ])?;
                }
                None => {
                    // Nothing to delete is fine: the link was unshaped already.
                    let _ = Command::new("tc")
                        .args(["-n", ns, "qdisc", "del", "dev", link, "root"])
                        .output();
                }
            }
        }
        Ok(())
    }

    /// Bytes that crossed the migration link so far, both directions.
    pub fn link_bytes(&self) -> Result<u64> {
        let ns = self.name(Side::Source);
        let out = Command::new("ip")
            .args(["-n", ns, "-s", "-j", "link", "show", SRC_LINK])
            .output()
            .context("run ip -s link")?;
        if !out.status.success() {
            bail!(
                "ip -s link show {SRC_LINK} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parse ip -j output")?;
        let stats = &v[0]["stats64"];
        let rx = stats["rx"]["bytes"].as_u64();
        let tx = stats["tx"]["bytes"].as_u64();
        match (rx, tx) {
            (Some(rx), Some(tx)) => Ok(rx + tx),
            _ => bail!("ip -s -j link show {SRC_LINK}: no byte counters"),
        }
    }

    /// Puts the service address on the source and routes the clients to it there.
    pub fn reset_service_address(&self) -> Result<()> {
        let addr = format!("{SERVICE_ADDR}/32");
        let (src, dst, cli) = (
            self.name(Side::Source),
            self.name(Side::Destination),
            self.name(Side::Clients),
        );
        // Either may hold it after an earlier cell.
        let _ = Command::new("ip")
            .args(["-n", dst, "addr", "del", &addr, "dev", "lo"])
            .output();
        let _ = Command::new("ip")
            .args(["-n", src, "addr", "del", &addr, "dev", "lo"])
            .output();
        ip(&["-n", src, "addr", "add", &addr, "dev", "lo"])?;
        ip(&["-n", cli, "route", "replace", &addr, "via", CLI_VIA_SRC])
    }

    /// The destination took over: the address moves with the server.
    pub fn move_service_address(&self) -> Result<()> {
        let addr = format!("{SERVICE_ADDR}/32");
        let (src, dst, cli) = (
            self.name(Side::Source),
            self.name(Side::Destination),
            self.name(Side::Clients),
        );
        ip(&["-n", dst, "addr", "add", &addr, "dev", "lo"])?;
        ip(&["-n", cli, "route", "replace", &addr, "via", CLI_VIA_DST])?;
        ip(&["-n", src, "addr", "del", &addr, "dev", "lo"])
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for name in self.created.drain(..) {
            if let Err(e) = ip(&["netns", "del", &name]) {
                eprintln!("migrate: cannot delete network namespace {name}: {e:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn tc(args: &[&str]) -> Result<()> {
    run("tc", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
