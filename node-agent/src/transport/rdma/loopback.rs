//! An RNIC endpoint for tests: the real [`Engine`] over the recording fake
//! verbs layer, whose prober and responder queue pairs are wired to each
//! other. Everything above the verbs (engine, GRH parsing, flow labels, the
//! probe protocol) runs as it does on hardware; only the device is fake.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};

use super::clock::NicClock;
use super::device::RdmaDevice;
use super::engine::{Engine, EngineConfig};
use super::verbs::RecordingVerbs;
use super::{
    DeviceEvent, Gid, QpRole, RdmaDest, RdmaError, RdmaEvent, RnicEndpointSpec, SendReceipt,
};

/// A fake RNIC endpoint; [`LoopbackDevice::events`] injects device events.
#[derive(Debug)]
pub struct LoopbackDevice {
    engine: Mutex<Engine<RecordingVerbs>>,
    spec: RnicEndpointSpec,
    qpns: [u32; 2],
    nic_timed: bool,
    wake: [Notify; 2],
    device_events: tokio::sync::Mutex<mpsc::UnboundedReceiver<DeviceEvent>>,
}

impl LoopbackDevice {
    /// A device for `spec` with the given QPNs; `nic_clock` false makes it a
    /// device without completion timestamps. Returns the sender of its device events.
    pub fn open(
        spec: RnicEndpointSpec,
        qpns: [u32; 2],
        nic_clock: bool,
    ) -> Result<(Arc<Self>, mpsc::UnboundedSender<DeviceEvent>), RdmaError> {
        let mut verbs = RecordingVerbs::new(spec.gid);
        verbs.recording = false;
        verbs.qpns = qpns;
        // A 1 GHz fake clock advancing 1 µs per completion: stamps ordered like a NIC's.
        verbs.cycles_per_op = 1_000;
        if !nic_clock {
            verbs.clock = None;
        }
        let clock = if nic_clock {
            NicClock::new(1_000_000, u64::MAX)
        } else {
            None
        };
        let engine = Engine::new(
            verbs,
            EngineConfig {
                local_gid: spec.gid,
                traffic_class: 0,
                service_level: 0,
                ah_cache_capacity: 256,
            },
            clock,
        )?;
        let nic_timed = engine.nic_timed();
        let (tx, rx) = mpsc::unbounded_channel();
        Ok((
            Arc::new(Self {
                engine: Mutex::new(engine),
                spec,
                qpns,
                nic_timed,
                wake: [Notify::new(), Notify::new()],
                device_events: tokio::sync::Mutex::new(rx),
            }),
            tx,
        ))
    }

    /// A spec for a fake port `device` with an IPv4-mapped GID.
    pub fn spec(node: &str, device: &str, ip: [u8; 4]) -> RnicEndpointSpec {
        RnicEndpointSpec {
            endpoint_id: format!("{node}/{device}-p1"),
            device: device.to_owned(),
            port: 1,
            gid_index: 3,
            gid: Gid::from_ipv4(ip),
            netdev: None,
            port_active: true,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Engine<RecordingVerbs>> {
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl RdmaDevice for LoopbackDevice {
    fn spec(&self) -> &RnicEndpointSpec {
        &self.spec
    }

    fn qpn(&self, role: QpRole) -> u32 {
        self.qpns[role.index()]
    }

    fn nic_timestamps(&self) -> bool {
        self.nic_timed
    }

    fn send_to(
        &self,
        role: QpRole,
        payload: &[u8],
        dest: &RdmaDest,
    ) -> Result<SendReceipt, RdmaError> {
        let receipt = self.lock().send(role, payload, dest)?;
        // The send completed and may have landed on the other queue pair.
        for waker in &self.wake {
            waker.notify_one();
        }
        Ok(receipt)
    }

    async fn next_event(&self, role: QpRole, buf: &mut [u8]) -> Result<RdmaEvent, RdmaError> {
        loop {
            let notified = self.wake[role.index()].notified();
            if let Some(event) = self.lock().next_ready(role, buf)? {
                return Ok(event);
            }
            notified.await;
        }
    }

    async fn next_device_event(&self) -> Result<DeviceEvent, RdmaError> {
        match self.device_events.lock().await.recv().await {
            Some(event) => Ok(event),
            None => std::future::pending().await,
        }
    }
}
