//! The mesh's probe keys: derived from a master secret read from a file, one
//! key per rotation epoch, so every replica and every restart hands agents the
//! same keys without coordinating (see `pingmesh_proto::probe_auth` and
//! docs/security.md, "Probe authentication").

use std::path::{Path, PathBuf};

use pingmesh_proto::probe_auth::{MIN_MASTER_LEN, keys_around};
use pingmesh_proto::v1;

use crate::config::ProbeAuthConfig;

/// Why probe authentication cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeKeyError {
    #[error(
        "probe authentication is configured but its key file {path} cannot be read: {source} \
         (set probeAuth.keyFile / --probe-key-file to a file holding the mesh's master secret, \
         or leave probe authentication off; docs/security.md)"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the probe key file {path} holds {len} bytes of secret; at least {MIN_MASTER_LEN} are needed"
    )]
    TooShort { path: PathBuf, len: usize },
    #[error("probeAuth.rotationSecs must be at least 60, got {0}")]
    BadRotation(u64),
}

/// Derives the keys of each rotation epoch from the master secret.
pub struct ProbeKeySchedule {
    master: Vec<u8>,
    rotation_ms: u64,
}

impl std::fmt::Debug for ProbeKeySchedule {
    // The master secret never goes into a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeKeySchedule")
            .field("rotation_ms", &self.rotation_ms)
            .finish_non_exhaustive()
    }
}

impl ProbeKeySchedule {
    /// Reads the master secret named by `config`. Surrounding whitespace (a
    /// trailing newline of a hand-written file) is not part of the secret.
    pub fn load(config: &ProbeAuthConfig) -> Result<Self, ProbeKeyError> {
        let bytes = std::fs::read(&config.key_file).map_err(|source| ProbeKeyError::Read {
            path: config.key_file.clone(),
            source,
        })?;
        Self::new(&config.key_file, bytes.trim_ascii(), config.rotation_secs)
    }

    fn new(path: &Path, master: &[u8], rotation_secs: u64) -> Result<Self, ProbeKeyError> {
        if master.len() < MIN_MASTER_LEN {
            return Err(ProbeKeyError::TooShort {
                path: path.to_owned(),
                len: master.len(),
            });
        }
        if rotation_secs < 60 {
            return Err(ProbeKeyError::BadRotation(rotation_secs));
        }
        Ok(Self {
            master: master.to_vec(),
            rotation_ms: rotation_secs.saturating_mul(1_000),
        })
    }

    /// The key epoch at Unix time `now_ms`.
    pub fn epoch(&self, now_ms: u64) -> u64 {
        now_ms / self.rotation_ms
    }

    /// The previous, current and next keys of `epoch`, as agents get them.
    pub fn keys(&self, epoch: u64) -> v1::ProbeKeys {
        keys_around(&self.master, epoch)
    }
}

#[cfg(test)]
mod tests {
    use pingmesh_proto::probe_auth::{derive_key, key_id};

    use super::*;

    fn config(dir: &Path, secret: &[u8]) -> ProbeAuthConfig {
        let path = dir.join("probe-key");
        std::fs::write(&path, secret).unwrap();
        ProbeAuthConfig {
            key_file: path,
            rotation_secs: 3_600,
        }
    }

    #[test]
    fn every_replica_reading_the_same_file_derives_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let secret = b"aVeryLongRandomAlphanumericSecretOf64CharactersGeneratedByHelm00\n";
        let a = ProbeKeySchedule::load(&config(dir.path(), secret)).unwrap();
        let b = ProbeKeySchedule::load(&config(dir.path(), secret)).unwrap();
        let now = 1_796_000_000_000;
        assert_eq!(a.epoch(now), now / 3_600_000);
        assert_eq!(a.keys(a.epoch(now)), b.keys(b.epoch(now)));
        let keys = a.keys(500);
        assert_eq!(keys.current_id, u32::from(key_id(500)));
        // The trailing newline is not part of the secret.
        assert_eq!(keys.keys[1].key, derive_key(&secret[..64], 500));
        assert_ne!(a.keys(500), a.keys(501));
        assert!(!format!("{a:?}").contains("aVeryLong"));
    }

    #[test]
    fn a_missing_or_short_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = ProbeAuthConfig {
            key_file: dir.path().join("absent"),
            rotation_secs: 3_600,
        };
        let e = ProbeKeySchedule::load(&missing).unwrap_err().to_string();
        assert!(
            e.contains("absent") && e.contains("--probe-key-file"),
            "{e}"
        );
        let e = ProbeKeySchedule::load(&config(dir.path(), b"short"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 bytes"), "{e}");
        let mut fast = config(dir.path(), &[b'x'; 40]);
        fast.rotation_secs = 10;
        assert!(matches!(
            ProbeKeySchedule::load(&fast),
            Err(ProbeKeyError::BadRotation(10))
        ));
    }
}

#[cfg(test)]
mod controller_tests {
    use std::sync::Arc;

    use pingmesh_proto::probe_auth::keys_around;
    use pingmesh_proto::v1::{Endpoint, Transport};
    use pingmesh_proto::window::unix_now_ms;

    use crate::config::{MeshConfig, ProbeAuthConfig};
    use crate::mesh::controller::MeshController;
    use crate::mesh::registry::open_registry;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef";

    async fn controller(
        dir: &tempfile::TempDir,
        probe_auth: Option<ProbeAuthConfig>,
    ) -> Result<Arc<MeshController>, crate::mesh::controller::MeshError> {
        let config = MeshConfig {
            registry: format!("sqlite://{}", dir.path().join("registry.db").display()),
            probe_auth,
            ..MeshConfig::default()
        };
        let registry = open_registry(&config.registry).await.unwrap();
        MeshController::new(config, registry).await
    }

    /// Registers and connects n1 and n2; they stay connected while the
    /// returned guards live.
    async fn connect_two(controller: &Arc<MeshController>) -> Vec<impl Drop> {
        let mut present = Vec::new();
        for (node, port) in [("n1", 7001), ("n2", 7002)] {
            let endpoint = Endpoint {
                id: format!("{node}/udp0"),
                transport: Transport::Udp as i32,
                address: format!("127.0.0.1:{port}"),
                ..Endpoint::default()
            };
            let (session, _) = controller
                .register(node, "test", &[endpoint])
                .await
                .unwrap();
            present.push(controller.connect(node, session));
        }
        present
    }

    #[tokio::test]
    async fn with_probe_auth_pinglists_carry_the_previous_current_and_next_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("probe-key");
        std::fs::write(&key_file, SECRET).unwrap();
        let auth = ProbeAuthConfig {
            key_file,
            rotation_secs: 3_600,
        };
        let controller = controller(&dir, Some(auth)).await.unwrap();
        let _present = connect_two(&controller).await;
        let snapshot = controller.subscribe().borrow().clone();
        let now_epoch = unix_now_ms() / 3_600_000;
        let list = controller.pinglist("n1", &snapshot);
        assert!(!list.targets.is_empty());
        assert_eq!(list.probe_keys, Some(keys_around(SECRET, now_epoch)));
        assert_eq!(list.probe_keys.unwrap().keys.len(), 3);

        // The same epoch again: nothing to publish. The next hour: the keys roll.
        assert!(!controller.roll_probe_keys(unix_now_ms()));
        let next_hour = (now_epoch + 1) * 3_600_000;
        let mut snapshots = controller.subscribe();
        assert!(controller.roll_probe_keys(next_hour));
        // The background loop publishes on a roll; here a registration does.
        controller
            .register(
                "n3",
                "test",
                &[Endpoint {
                    id: "n3/udp0".into(),
                    transport: Transport::Udp as i32,
                    address: "127.0.0.1:7003".into(),
                    ..Endpoint::default()
                }],
            )
            .await
            .unwrap();
        snapshots.changed().await.unwrap();
        let rolled = snapshots.borrow_and_update().clone();
        assert_eq!(
            controller.pinglist("n1", &rolled).probe_keys,
            Some(keys_around(SECRET, now_epoch + 1))
        );
    }

    #[tokio::test]
    async fn without_probe_auth_pinglists_carry_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        let controller = controller(&dir, None).await.unwrap();
        let _present = connect_two(&controller).await;
        let snapshot = controller.subscribe().borrow().clone();
        assert_eq!(controller.pinglist("n1", &snapshot).probe_keys, None);
        assert!(!controller.roll_probe_keys(unix_now_ms() + 7_200_000));
    }

    #[tokio::test]
    async fn a_missing_key_file_stops_the_controller_from_starting() {
        let dir = tempfile::tempdir().unwrap();
        let auth = ProbeAuthConfig {
            key_file: dir.path().join("not-there"),
            rotation_secs: 3_600,
        };
        let e = controller(&dir, Some(auth)).await.unwrap_err().to_string();
        assert!(e.contains("not-there"), "{e}");
    }
}
