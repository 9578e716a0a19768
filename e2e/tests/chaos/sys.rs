//! Root-only machinery: a network namespace for the controller that can be cut
//! off, and a small tmpfs that can be filled. Each undoes itself when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(run(args), "{} failed", args.join(" "));
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
            .unwrap_or(false)
    })
}

/// Network namespace `pmc-ctl` joined to the host's by one veth pair:
/// 10.79.0.1 inside, 10.79.0.2 on the host. Nothing else reaches it.
pub struct ControllerNetns {
    /// Whether the partition's rules are in: each rule goes in and out once.
    cut: std::cell::Cell<bool>,
}

impl ControllerNetns {
    pub const NAME: &'static str = "pmc-ctl";
    pub const INSIDE: &'static str = "10.79.0.1";

    pub fn create() -> Self {
        // A namespace left by an aborted run goes first (its veth with it).
        if Path::new("/run/netns").join(Self::NAME).exists() {
            let _ = run(&["ip", "netns", "del", Self::NAME]);
        }
        must(&["ip", "netns", "add", Self::NAME]);
        let this = Self {
            cut: std::cell::Cell::new(false),
        };
        must(&[
            "ip",
            "link",
            "add",
            "pmc-h",
            "type",
            "veth",
            "peer",
            "name",
            "pmc-c",
            "netns",
            Self::NAME,
        ]);
        must(&["ip", "addr", "add", "10.79.0.2/24", "dev", "pmc-h"]);
        must(&["ip", "link", "set", "pmc-h", "up"]);
        let ns = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", Self::NAME];
            all.extend_from_slice(args);
            must(&all);
        };
        ns(&["ip", "addr", "add", "10.79.0.1/24", "dev", "pmc-c"]);
        ns(&["ip", "link", "set", "pmc-c", "up"]);
        ns(&["ip", "link", "set", "lo", "up"]);
        this
    }

    /// Drops everything on the veth, both ways, inside the namespace: the
    /// controller and every agent lose each other; loopback inside stays up.
    pub fn partition(&self) {
        assert!(!self.cut.replace(true), "partitioned twice");
        for chain in [["INPUT", "-i"], ["OUTPUT", "-o"]] {
            must(&[
                "ip",
                "netns",
                "exec",
                Self::NAME,
                "iptables",
                "-I",
                chain[0],
                chain[1],
                "pmc-c",
                "-j",
                "DROP",
            ]);
        }
    }

    pub fn heal(&self) {
        assert!(self.cut.replace(false), "healed without a partition");
        for chain in [["INPUT", "-i"], ["OUTPUT", "-o"]] {
            must(&[
                "ip",
                "netns",
                "exec",
                Self::NAME,
                "iptables",
                "-D",
                chain[0],
                chain[1],
                "pmc-c",
                "-j",
                "DROP",
            ]);
        }
    }
}

impl Drop for ControllerNetns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", Self::NAME]);
    }
}

/// A tmpfs of a fixed size mounted on a fresh directory.
pub struct SmallDisk {
    pub dir: PathBuf,
}

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let options = format!("size={size}");
        must(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            dir.to_str().expect("utf-8 path"),
        ]);
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes `name` until the filesystem is full; returns the bytes written.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.dir.join(name)).expect("filler");
        let chunk = vec![0u8; 4096];
        let mut written = 0;
        while file.write_all(&chunk).is_ok() {
            written += 4096;
        }
        let _ = file.sync_all();
        written
    }

    pub fn free(&self, name: &str) {
        std::fs::remove_file(self.dir.join(name)).expect("remove filler");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run(&["umount", "-l", self.dir.to_str().unwrap_or("/nonexistent")]);
    }
}

/// `PRAGMA integrity_check` of a SQLite file with the sqlite3 shell.
pub fn sqlite_integrity(db: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg("PRAGMA integrity_check;")
        .output()
        .expect("run sqlite3 (Debian package sqlite3)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// One number from a query of a SQLite file with the sqlite3 shell.
pub fn sqlite_count(db: &Path, sql: &str) -> Option<u64> {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Drops every UDP datagram to one loopback address (an agent's probes and
/// ACKs) in the host's iptables; removed when dropped.
pub struct UdpBlackHole(String);

impl UdpBlackHole {
    pub fn insert(ip: &str) -> Self {
        must(&[
            "iptables", "-I", "INPUT", "-d", ip, "-p", "udp", "-j", "DROP",
        ]);
        Self(ip.to_owned())
    }
}

impl Drop for UdpBlackHole {
    fn drop(&mut self) {
        let _ = run(&[
            "iptables", "-D", "INPUT", "-d", &self.0, "-p", "udp", "-j", "DROP",
        ]);
    }
}
