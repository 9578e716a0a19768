//! Finds the RNIC ports of this host under a sysfs root and picks each one's GID.
//!
//! The root is a parameter (normally [`DEFAULT_SYSFS_ROOT`]) so tests build a
//! fake tree in a temporary directory. Each usable port becomes one endpoint
//! with its own id, `"<node>/<device>-p<port>"`; a port that cannot be used is
//! reported with the reason and the others go on.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::RdmaError;
use super::gid::{Gid, GidChoiceError, GidEntry, GidType, choose_gid};

/// Where the kernel lists RDMA devices.
pub const DEFAULT_SYSFS_ROOT: &str = "/sys/class/infiniband";

/// Vendor id soft-RoCE (rxe) reports from `ibv_query_device`.
pub const SOFT_ROCE_VENDOR_ID: u32 = 0x00FF_FFFF;

/// One RNIC port the agent can probe from, with the GID it will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RnicEndpointSpec {
    /// `"<node>/<device>-p<port>"`, unique in the mesh and stable across restarts.
    pub endpoint_id: String,
    pub device: String,
    pub port: u8,
    pub gid_index: u16,
    pub gid: Gid,
    /// The network interface behind the GID, when sysfs names one.
    pub netdev: Option<String>,
    /// The port state file said ACTIVE when discovered.
    pub port_active: bool,
}

/// What discovery found: usable endpoints, and why the other ports were left out.
#[derive(Debug, Default)]
pub struct Discovery {
    pub endpoints: Vec<RnicEndpointSpec>,
    pub skipped: Vec<RdmaError>,
}

/// Lists RNIC ports under `sysfs_root`, keeping devices named in `allow_list`
/// (all when empty), and chooses each port's GID (`gid_index_override` forces
/// an index on every port). A missing root means no devices, not an error.
pub fn discover_endpoints(
    sysfs_root: &Path,
    node: &str,
    allow_list: &[String],
    gid_index_override: Option<u16>,
) -> Discovery {
    let mut found = Discovery::default();
    let devices = match sorted_names(sysfs_root) {
        Ok(devices) => devices,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return found,
        Err(source) => {
            found.skipped.push(RdmaError::Sysfs {
                path: sysfs_root.to_path_buf(),
                source,
            });
            return found;
        }
    };
    for device in devices {
        if !allow_list.is_empty() && !allow_list.contains(&device) {
            continue;
        }
        let ports_dir = sysfs_root.join(&device).join("ports");
        let ports = match sorted_names(&ports_dir) {
            Ok(ports) => ports,
            Err(source) => {
                found.skipped.push(RdmaError::Sysfs {
                    path: ports_dir,
                    source,
                });
                continue;
            }
        };
        for port in ports.iter().filter_map(|p| p.parse::<u8>().ok()) {
            match port_endpoint(sysfs_root, node, &device, port, gid_index_override) {
                Ok(spec) => found.endpoints.push(spec),
                Err(e) => found.skipped.push(e),
            }
        }
    }
    found
}

fn port_endpoint(
    root: &Path,
    node: &str,
    device: &str,
    port: u8,
    gid_index_override: Option<u16>,
) -> Result<RnicEndpointSpec, RdmaError> {
    let port_dir = port_dir(root, device, port);
    let link_layer = read_trimmed(&port_dir.join("link_layer"))?;
    if link_layer != "Ethernet" {
        return Err(RdmaError::NotRoce {
            device: device.to_owned(),
            port,
            link_layer,
        });
    }
    // "4: ACTIVE"; an unreadable state is treated as down (probing waits for PortUp).
    let port_active = read_trimmed(&port_dir.join("state")).is_ok_and(|s| s.ends_with("ACTIVE"));
    let table = read_gid_table(root, device, port)?;
    let entry = choose_gid(&table, gid_index_override).map_err(|e| match e {
        GidChoiceError::Unusable { index, reason } => RdmaError::GidNotUsable {
            device: device.to_owned(),
            port,
            index,
            reason,
        },
        GidChoiceError::NoRoceV2Ipv4 { checked } => RdmaError::NoRoceV2Gid {
            device: device.to_owned(),
            port,
            checked,
        },
    })?;
    let GidEntry {
        index, gid, netdev, ..
    } = entry;
    Ok(RnicEndpointSpec {
        endpoint_id: format!("{node}/{device}-p{port}"),
        device: device.to_owned(),
        port,
        gid_index: index,
        // choose_gid only returns entries whose address was read.
        gid: gid.unwrap_or_default(),
        netdev,
        port_active,
    })
}

/// Reads a port's GID table. Entries whose files cannot be read are kept with
/// the unreadable part as `None` (the kernel refuses to read the type of an
/// empty entry); only a missing `gids` directory is an error.
pub fn read_gid_table(root: &Path, device: &str, port: u8) -> Result<Vec<GidEntry>, RdmaError> {
    let port_dir = port_dir(root, device, port);
    let gids_dir = port_dir.join("gids");
    let names = sorted_names(&gids_dir).map_err(|source| RdmaError::Sysfs {
        path: gids_dir.clone(),
        source,
    })?;
    let mut indexes: Vec<u16> = names.iter().filter_map(|n| n.parse().ok()).collect();
    indexes.sort_unstable();
    Ok(indexes
        .into_iter()
        .map(|index| {
            let name = index.to_string();
            GidEntry {
                index,
                gid: read_trimmed(&gids_dir.join(&name))
                    .ok()
                    .and_then(|t| t.parse().ok()),
                kind: read_trimmed(&port_dir.join("gid_attrs/types").join(&name))
                    .ok()
                    .and_then(|t| GidType::parse(&t)),
                netdev: read_trimmed(&port_dir.join("gid_attrs/ndevs").join(&name))
                    .ok()
                    .filter(|n| !n.is_empty()),
            }
        })
        .collect())
}

/// The kernel driver bound to the device (`mlx5_core`, ...), when sysfs has a
/// `device/driver` link; soft devices (rxe) have none.
pub fn driver_name(root: &Path, device: &str) -> Option<String> {
    let target = fs::read_link(root.join(device).join("device/driver")).ok()?;
    target.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// Soft-RoCE (rxe) re-delivers completions through the extended poll API and
/// has no completion timestamps: such devices are polled the classic way.
pub fn is_soft_roce(driver: Option<&str>, device: &str, vendor_id: u32) -> bool {
    driver == Some("rdma_rxe")
        || vendor_id == SOFT_ROCE_VENDOR_ID
        || (driver.is_none() && device.starts_with("rxe"))
}

fn port_dir(root: &Path, device: &str, port: u8) -> PathBuf {
    root.join(device).join("ports").join(port.to_string())
}

fn read_trimmed(path: &Path) -> Result<String, RdmaError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| RdmaError::Sysfs {
            path: path.to_path_buf(),
            source,
        })
}

fn sorted_names(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a fake `/sys/class/infiniband` tree.
    pub(crate) struct FakeSysfs {
        pub dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        pub(crate) fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        pub(crate) fn root(&self) -> &Path {
            self.dir.path()
        }

        fn write(&self, rel: &str, text: &str) {
            let path = self.root().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }

        /// A RoCE port; `gids` are (address, type text or None for an unreadable type file).
        pub(crate) fn port(&self, dev: &str, port: u8, state: &str, gids: &[(&str, Option<&str>)]) {
            let base = format!("{dev}/ports/{port}");
            self.write(&format!("{base}/link_layer"), "Ethernet\n");
            self.write(&format!("{base}/state"), &format!("{state}\n"));
            for (i, (gid, kind)) in gids.iter().enumerate() {
                self.write(&format!("{base}/gids/{i}"), &format!("{gid}\n"));
                match kind {
                    Some(kind) => {
                        self.write(&format!("{base}/gid_attrs/types/{i}"), &format!("{kind}\n"));
                    }
                    // A directory where a file should be: reading it fails like EINVAL does.
                    None => {
                        fs::create_dir_all(self.root().join(format!("{base}/gid_attrs/types/{i}")))
                            .unwrap();
                    }
                }
                self.write(&format!("{base}/gid_attrs/ndevs/{i}"), "eth0\n");
            }
        }

        pub(crate) fn typical_port(&self, dev: &str, port: u8, ipv4_hex: &str) {
            let v4 = format!("0000:0000:0000:0000:0000:ffff:{ipv4_hex}");
            self.port(
                dev,
                port,
                "4: ACTIVE",
                &[
                    (
                        "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
                        Some("IB/RoCE v1"),
                    ),
                    ("fe80:0000:0000:0000:0202:c9ff:fe00:0001", Some("RoCE v2")),
                    (&v4, Some("IB/RoCE v1")),
                    (&v4, Some("RoCE v2")),
                    ("0000:0000:0000:0000:0000:0000:0000:0000", None),
                ],
            );
        }
    }

    #[test]
    fn each_rnic_port_becomes_an_endpoint_with_its_roce_v2_ipv4_gid() {
        let fake = FakeSysfs::new();
        fake.typical_port("mlx5_0", 1, "0a00:0007");
        fake.typical_port("mlx5_1", 1, "0a00:0107");
        let found = discover_endpoints(fake.root(), "node-a", &[], None);
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        let ids: Vec<_> = found
            .endpoints
            .iter()
            .map(|e| e.endpoint_id.as_str())
            .collect();
        assert_eq!(ids, ["node-a/mlx5_0-p1", "node-a/mlx5_1-p1"]);
        let first = &found.endpoints[0];
        assert_eq!(
            (first.gid_index, first.gid),
            (3, Gid::from_ipv4([10, 0, 0, 7]))
        );
        assert_eq!(first.netdev.as_deref(), Some("eth0"));
        assert!(first.port_active);
        assert_eq!(found.endpoints[1].gid, Gid::from_ipv4([10, 0, 1, 7]));
    }

    #[test]
    fn the_allow_list_keeps_only_named_devices() {
        let fake = FakeSysfs::new();
        fake.typical_port("mlx5_0", 1, "0a00:0007");
        fake.typical_port("mlx5_1", 1, "0a00:0107");
        let found = discover_endpoints(fake.root(), "n", &["mlx5_1".to_owned()], None);
        assert_eq!(found.endpoints.len(), 1);
        assert_eq!(found.endpoints[0].device, "mlx5_1");
    }

    #[test]
    fn a_bad_override_names_device_port_and_index() {
        let fake = FakeSysfs::new();
        fake.typical_port("mlx5_0", 1, "0a00:0007");
        let found = discover_endpoints(fake.root(), "n", &[], Some(0));
        assert!(found.endpoints.is_empty());
        let message = found.skipped[0].to_string();
        for needle in ["mlx5_0", "port 1", "GID 0", "v1"] {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        assert_eq!(found.skipped[0].category(), "gid_not_usable");
    }

    #[test]
    fn a_port_without_a_v2_ipv4_gid_is_skipped_with_a_reason_and_others_go_on() {
        let fake = FakeSysfs::new();
        fake.port(
            "mlx5_0",
            1,
            "1: DOWN",
            &[
                (
                    "fe80:0000:0000:0000:0202:c9ff:fe00:0001",
                    Some("IB/RoCE v1"),
                ),
                ("fe80:0000:0000:0000:0202:c9ff:fe00:0001", Some("RoCE v2")),
                ("0000:0000:0000:0000:0000:0000:0000:0000", Some("RoCE v2")),
            ],
        );
        fake.typical_port("mlx5_1", 1, "0a00:0107");
        let found = discover_endpoints(fake.root(), "n", &[], None);
        assert_eq!(found.endpoints.len(), 1);
        assert_eq!(found.skipped.len(), 1);
        assert!(matches!(
            &found.skipped[0],
            RdmaError::NoRoceV2Gid { device, port: 1, checked: 3 } if device == "mlx5_0"
        ));
    }

    #[test]
    fn unreadable_type_files_and_garbage_gids_do_not_stop_selection() {
        let fake = FakeSysfs::new();
        fake.port(
            "rxe0",
            1,
            "4: ACTIVE",
            &[
                ("fe80:0000:0000:0000:0202:c9ff:fe00:0001", None),
                ("garbage", Some("RoCE v2")),
                ("0000:0000:0000:0000:0000:ffff:0a00:0009", None),
                ("0000:0000:0000:0000:0000:ffff:0a00:0009", Some("RoCE v2")),
            ],
        );
        let table = read_gid_table(fake.root(), "rxe0", 1).unwrap();
        assert_eq!(table[0].kind, None);
        assert_eq!(table[1].gid, None);
        let found = discover_endpoints(fake.root(), "n", &[], None);
        assert_eq!(found.endpoints[0].gid_index, 3);
    }

    #[test]
    fn infiniband_ports_are_skipped_as_not_roce() {
        let fake = FakeSysfs::new();
        fake.typical_port("mlx5_0", 1, "0a00:0007");
        fake.write("mlx5_0/ports/1/link_layer", "InfiniBand\n");
        let found = discover_endpoints(fake.root(), "n", &[], None);
        assert_eq!(found.skipped[0].category(), "not_roce");
    }

    #[test]
    fn a_missing_sysfs_root_means_no_devices() {
        let fake = FakeSysfs::new();
        let found = discover_endpoints(&fake.root().join("absent"), "n", &[], None);
        assert!(found.endpoints.is_empty() && found.skipped.is_empty());
    }

    #[test]
    fn more_than_ten_gid_entries_are_read_in_numeric_order() {
        let fake = FakeSysfs::new();
        let mut gids: Vec<(&str, Option<&str>)> =
            vec![("0000:0000:0000:0000:0000:0000:0000:0000", Some("RoCE v2")); 12];
        gids[11] = ("0000:0000:0000:0000:0000:ffff:0a00:000b", Some("RoCE v2"));
        gids[2] = ("0000:0000:0000:0000:0000:ffff:0a00:0002", Some("RoCE v2"));
        fake.port("mlx5_0", 1, "4: ACTIVE", &gids);
        let table = read_gid_table(fake.root(), "mlx5_0", 1).unwrap();
        let order: Vec<u16> = table.iter().map(|e| e.index).collect();
        assert_eq!(order, (0..12).collect::<Vec<u16>>());
        assert_eq!(
            discover_endpoints(fake.root(), "n", &[], None).endpoints[0].gid_index,
            2
        );
    }

    #[test]
    fn soft_roce_is_recognised_by_driver_vendor_or_name() {
        assert!(is_soft_roce(Some("rdma_rxe"), "roce0", 0));
        assert!(is_soft_roce(None, "anything", SOFT_ROCE_VENDOR_ID));
        assert!(is_soft_roce(None, "rxe0", 0));
        assert!(!is_soft_roce(Some("mlx5_core"), "rxe_named_mlx", 0x02c9));
    }
}
