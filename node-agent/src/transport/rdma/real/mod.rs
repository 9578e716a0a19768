//! The RDMA endpoint on Linux: a [`RealVerbs`] device driven by the shared
//! [`Engine`], with its completion channels and asynchronous event descriptor
//! registered with tokio, so waiting for completions costs no CPU.

mod sys;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use tokio::io::unix::AsyncFd;

use self::sys::{DeviceFd, RealVerbs};
use super::clock::NicClock;
use super::discovery::{DEFAULT_SYSFS_ROOT, driver_name, is_soft_roce};
use super::engine::{Engine, EngineConfig};
use super::{
    Availability, DeviceEvent, QpRole, RdmaConfig, RdmaDest, RdmaError, RdmaEvent,
    RnicEndpointSpec, SendReceipt, device_event_of,
};

/// Whether libibverbs lists any device. Never panics: a kernel without an
/// RDMA stack (NULL with ENOSYS) or an empty list is "unavailable".
pub fn rdma_available() -> Availability {
    Availability::from_listing(sys::device_listing())
}

/// One RNIC port: a prober and a responder UD queue pair sharing a
/// protection domain and an address-handle cache.
///
/// Shared through an `Arc`: sends take `&self`; one task per role may wait in
/// [`Self::next_event`] and one in [`Self::next_device_event`].
#[derive(Debug)]
pub struct RdmaEndpoint {
    // Field order is drop order: the descriptors leave epoll before the
    // engine tears the device down.
    channels: [AsyncFd<DeviceFd>; 2],
    async_events: AsyncFd<DeviceFd>,
    engine: Mutex<Engine<RealVerbs>>,
    spec: RnicEndpointSpec,
    qpns: [u32; 2],
    nic_timed: bool,
}

impl RdmaEndpoint {
    /// Opens the device of `config.spec`, creates both queue pairs (INIT ->
    /// RTR -> RTS) and posts their receives. Must run inside a tokio runtime.
    pub fn open(config: &RdmaConfig) -> Result<Self, RdmaError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RdmaError::NoRuntime);
        }
        let spec = config.spec.clone();
        let driver = driver_name(Path::new(DEFAULT_SYSFS_ROOT), &spec.device);
        let (verbs, info) = RealVerbs::open(config, |vendor| {
            is_soft_roce(driver.as_deref(), &spec.device, vendor)
        })?;
        let clock = if info.timestamps_on_cq {
            NicClock::new(info.hca_core_clock_khz, info.completion_timestamp_mask)
        } else {
            None
        };
        let qpns = [verbs.qpn(QpRole::Prober), verbs.qpn(QpRole::Responder)];
        let fds = [
            verbs.channel_fd(QpRole::Prober),
            verbs.channel_fd(QpRole::Responder),
            verbs.async_fd(),
        ];
        let engine = Engine::new(
            verbs,
            EngineConfig {
                local_gid: spec.gid,
                traffic_class: config.traffic_class,
                service_level: config.service_level,
                ah_cache_capacity: config.ah_cache_capacity,
            },
            clock,
        )?;
        let nic_timed = engine.nic_timed();
        let register = |fd| {
            sys::watch(fd).map_err(|source| RdmaError::Verbs {
                op: "epoll registration",
                device: spec.device.clone(),
                source,
            })
        };
        let channels = [register(fds[0])?, register(fds[1])?];
        let async_events = register(fds[2])?;
        tracing::info!(
            endpoint = %spec.endpoint_id,
            gid = %spec.gid,
            gid_index = spec.gid_index,
            prober_qpn = qpns[0],
            responder_qpn = qpns[1],
            nic_timestamps = nic_timed,
            "RDMA endpoint open"
        );
        Ok(Self {
            channels,
            async_events,
            engine: Mutex::new(engine),
            spec,
            qpns,
            nic_timed,
        })
    }

    /// The port and GID this endpoint uses.
    pub fn spec(&self) -> &RnicEndpointSpec {
        &self.spec
    }

    /// The QPN of `role`'s queue pair (the responder's is the one registered).
    pub fn qpn(&self, role: QpRole) -> u32 {
        self.qpns[role.index()]
    }

    /// Completions carry NIC timestamps (else samples are software-timed).
    pub fn nic_timestamps(&self) -> bool {
        self.nic_timed
    }

    /// Posts `payload` to `dest` from `role`'s queue pair. Never blocks: a
    /// full send queue is an error the caller counts.
    pub fn send_to(
        &self,
        role: QpRole,
        payload: &[u8],
        dest: &RdmaDest,
    ) -> Result<SendReceipt, RdmaError> {
        self.lock().send(role, payload, dest)
    }

    /// Waits for the next datagram or send completion on `role`'s queue pair.
    pub async fn next_event(&self, role: QpRole, buf: &mut [u8]) -> Result<RdmaEvent, RdmaError> {
        let channel = &self.channels[role.index()];
        loop {
            if let Some(event) = self.lock().next_ready(role, buf)? {
                return Ok(event);
            }
            let mut guard = channel
                .readable()
                .await
                .map_err(|e| self.error("waiting for completions", e))?;
            let drained = self.lock().verbs_mut().drain_channel(role);
            drained.map_err(|e| self.error("ibv_get_cq_event", e))?;
            // Drained to EAGAIN; a notification after the guard was taken keeps the fd ready.
            guard.clear_ready();
        }
    }

    /// Waits for the next asynchronous device event (port down/up, fatal).
    pub async fn next_device_event(&self) -> Result<DeviceEvent, RdmaError> {
        loop {
            let mut guard = self
                .async_events
                .readable()
                .await
                .map_err(|e| self.error("waiting for device events", e))?;
            let next = self.lock().verbs_mut().next_async_event();
            match next.map_err(|e| self.error("ibv_get_async_event", e))? {
                Some((code, port)) => return Ok(device_event_of(code, port)),
                None => guard.clear_ready(),
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Engine<RealVerbs>> {
        // A panic while holding the lock is a bug elsewhere; the device state is still consistent.
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn error(&self, op: &'static str, source: std::io::Error) -> RdmaError {
        RdmaError::Verbs {
            op,
            device: self.spec.device.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_on_this_host_is_an_answer_not_a_panic() {
        // Without an RDMA stack this is Unavailable (NULL/ENOSYS); with one, Available.
        match rdma_available() {
            Availability::Available { devices } => assert!(!devices.is_empty()),
            Availability::Unavailable { reason } => assert!(!reason.is_empty()),
        }
    }

    #[tokio::test]
    async fn opening_a_device_that_does_not_exist_is_a_typed_error() {
        let spec = RnicEndpointSpec {
            endpoint_id: "n/absent0-p1".to_owned(),
            device: "absent0".to_owned(),
            port: 1,
            gid_index: 3,
            gid: super::super::Gid::from_ipv4([10, 0, 0, 1]),
            netdev: None,
            port_active: true,
        };
        let err = RdmaEndpoint::open(&RdmaConfig::new(spec)).unwrap_err();
        assert!(
            matches!(err.category(), "no_devices" | "device_not_found"),
            "unexpected {err}"
        );
    }

    #[test]
    fn opening_outside_a_runtime_is_an_error_not_a_panic() {
        let spec = RnicEndpointSpec {
            endpoint_id: "n/x-p1".to_owned(),
            device: "x".to_owned(),
            port: 1,
            gid_index: 0,
            gid: super::super::Gid::default(),
            netdev: None,
            port_active: true,
        };
        assert_eq!(
            RdmaEndpoint::open(&RdmaConfig::new(spec))
                .unwrap_err()
                .category(),
            "no_runtime"
        );
    }
}
