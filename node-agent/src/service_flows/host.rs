//! The flow table's view of the host: owners from `/proc` and the cgroup
//! tree, local GIDs from the RNICs' sysfs GID tables, and whether an idle
//! flow still exists.
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::cgroup::PodResolver;
use super::table::{Flow, FlowKey, Owner, Resolve};
use crate::tracer::Origin;

/// [`Resolve`] on the real host.
#[derive(Debug)]
pub struct HostResolver {
    pods: PodResolver,
    /// `/sys/class/infiniband`.
    sysfs_root: PathBuf,
}

impl HostResolver {
    pub fn new(pods: PodResolver, sysfs_root: impl Into<PathBuf>) -> Self {
        Self {
            pods,
            sysfs_root: sysfs_root.into(),
        }
    }
}

impl Resolve for HostResolver {
    fn owner(&mut self, origin: &Origin, now_ms: u64) -> Owner {
        Owner {
            pid: origin.pid,
            command: origin.comm.clone(),
            pod: self.pods.resolve(origin.pid, origin.cgroup_id, now_ms),
        }
    }

    fn local_gid(&mut self, device: &str, port: u8, sgid_index: u8) -> Option<String> {
        // The name comes from a traced process's memory: never a path.
        let plain = !device.is_empty()
            && device
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !plain {
            return None;
        }
        let file = self
            .sysfs_root
            .join(device)
            .join("ports")
            .join(port.to_string())
            .join("gids")
            .join(sgid_index.to_string());
        let gid: Ipv6Addr = fs::read_to_string(file).ok()?.trim().parse().ok()?;
        (!gid.is_unspecified()).then(|| gid.to_string())
    }
}

/// Whether an idle flow still exists: an RDMA queue pair lives as long as
/// its process (destroy records can be lost; a killed process destroys
/// nothing); a TCP connection is looked up in its owner's network namespace
/// (`<proc>/<pid>/net/tcp{,6}`). Unattributed TCP flows cannot be looked up
/// and are let go.
pub fn flow_alive(proc_root: &Path, key: &FlowKey, flow: &Flow) -> bool {
    let pid = flow.owner.pid;
    // A kernel consumer's queue pair (NVMe-oF, RDS, SMB Direct; seen by the
    // ib_core hooks with pid 0) has no process to outlive: it stays until
    // its destroy record.
    if pid == 0 {
        return matches!(key, FlowKey::Rdma { pid: 0, .. });
    }
    let pid_dir = proc_root.join(pid.to_string());
    match key {
        FlowKey::Rdma { .. } => pid_dir.exists(),
        FlowKey::Tcp { .. } => {
            let (Ok(local), Ok(remote)) = (
                flow.local_address.parse::<IpAddr>(),
                flow.remote_address.parse::<IpAddr>(),
            ) else {
                return false;
            };
            let (Ok(lport), Ok(rport)) = (
                u16::try_from(flow.local_port),
                u16::try_from(flow.remote_port),
            ) else {
                return false;
            };
            ["tcp", "tcp6"].iter().any(|f| {
                fs::read_to_string(pid_dir.join("net").join(f))
                    .is_ok_and(|table| has_connection(&table, (local, lport), (remote, rport)))
            })
        }
    }
}

/// Whether `/proc/net/tcp{,6}` text lists the connection (any state but
/// LISTEN and CLOSE).
pub fn has_connection(table: &str, local: (IpAddr, u16), remote: (IpAddr, u16)) -> bool {
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace().skip(1);
        let (Some(l), Some(r), Some(st)) = (f.next(), f.next(), f.next()) else {
            return false;
        };
        st != "0A" && st != "07" && same_endpoint(l, local) && same_endpoint(r, remote)
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): each 32-bit word
/// of the address printed as a native-endian integer, the port in hex.
fn same_endpoint(field: &str, (ip, port): (IpAddr, u16)) -> bool {
    let Some((addr, p)) = field.split_once(':') else {
        return false;
    };
    if u16::from_str_radix(p, 16).ok() != Some(port) {
        return false;
    }
    let words: Option<Vec<u32>> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let Some(words) = words else { return false };
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let listed = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes);
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return false,
    };
    listed == ip || listed == IpAddr::V6(mapped(ip))
}

fn mapped(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

    use pingmesh_proto::v1::ServiceFlowKind;

    use super::*;

    fn flow(pid: u32, local: SocketAddr, remote: SocketAddr) -> Flow {
        Flow {
            kind: ServiceFlowKind::Tcp,
            local_address: local.ip().to_string(),
            remote_address: remote.ip().to_string(),
            local_port: u32::from(local.port()),
            remote_port: u32::from(remote.port()),
            flow_label: 0,
            device: String::new(),
            owner: Owner {
                pid,
                ..Owner::default()
            },
            first_seen_ms: 0,
            last_seen_ms: 0,
        }
    }

    #[test]
    fn proc_net_tcp_rows_are_matched_by_both_endpoints() {
        // Real rows (little-endian host): 127.0.0.1:8080 <-> 127.0.0.1:40000.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        if cfg!(target_endian = "little") {
            let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
            assert!(has_connection(table, (lo, 8080), (lo, 40000)));
            assert!(!has_connection(table, (lo, 8080), (lo, 40001)));
            // The listener row is not a connection.
            assert!(!has_connection(
                table,
                (lo, 8080),
                (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
            ));
        }
        assert!(!has_connection(
            "header\n garbage\n 0: zz:zz yy:yy 01\n",
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 1),
            (IpAddr::V4(Ipv4Addr::LOCALHOST), 2)
        ));
    }

    #[test]
    fn a_live_tcp_connection_of_this_process_is_alive_and_a_closed_one_is_not() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let proc_root = Path::new("/proc");
        let f = flow(std::process::id(), local, remote);
        let key = FlowKey::Tcp { sock: 1 };
        assert!(flow_alive(proc_root, &key, &f));
        assert!(
            !flow_alive(proc_root, &key, &flow(0, local, remote)),
            "unattributed"
        );
        drop(client);
        drop(accepted);
        // The client side goes through FIN_WAIT/TIME_WAIT; a connection to a
        // port nobody uses is simply absent.
        let absent = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        assert!(!flow_alive(
            proc_root,
            &key,
            &flow(std::process::id(), local, absent)
        ));
    }

    #[test]
    fn an_rdma_flow_lives_as_long_as_its_process() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("77")).unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let key = FlowKey::Rdma { pid: 77, qpn: 1 };
        assert!(flow_alive(tmp.path(), &key, &flow(77, any, any)));
        assert!(!flow_alive(tmp.path(), &key, &flow(78, any, any)));
    }

    #[test]
    fn a_kernel_consumers_queue_pair_stays_until_its_destroy_record() {
        let tmp = tempfile::tempdir().unwrap();
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let kernel = FlowKey::Rdma { pid: 0, qpn: 9 };
        assert!(flow_alive(tmp.path(), &kernel, &flow(0, any, any)));
        // A TCP flow nobody owns is not kept on that ground.
        assert!(!flow_alive(
            tmp.path(),
            &FlowKey::Tcp { sock: 3 },
            &flow(0, any, any)
        ));
    }

    #[test]
    fn the_local_gid_comes_from_the_sysfs_gid_table() {
        let tmp = tempfile::tempdir().unwrap();
        let gids = tmp.path().join("mlx5_0/ports/1/gids");
        fs::create_dir_all(&gids).unwrap();
        fs::write(gids.join("3"), "0000:0000:0000:0000:0000:ffff:0a00:0001\n").unwrap();
        fs::write(gids.join("4"), "0000:0000:0000:0000:0000:0000:0000:0000\n").unwrap();
        let mut host = HostResolver::new(PodResolver::new(tmp.path(), None), tmp.path());
        assert_eq!(
            host.local_gid("mlx5_0", 1, 3).as_deref(),
            Some("::ffff:10.0.0.1")
        );
        assert_eq!(host.local_gid("mlx5_0", 1, 4), None, "an empty slot");
        assert_eq!(host.local_gid("mlx5_0", 2, 3), None);
        assert_eq!(host.local_gid("../mlx5_0", 1, 3), None);
        assert_eq!(host.local_gid("", 1, 3), None);
    }
}
