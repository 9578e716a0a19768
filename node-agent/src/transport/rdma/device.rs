//! The RDMA endpoint as the prober and the responder see it: each of its two
//! queue pairs is a [`ProbeSocket`] whose peers are [`RdmaDest`]s.
//!
//! [`RdmaDevice`] is what the agent needs of an opened RNIC endpoint. The real
//! endpoint implements it (and the stub, with the same API, where there is no
//! RDMA); tests implement it over the recording fake verbs layer, so the whole
//! probe path above the verbs runs without hardware.

use std::future::Future;
use std::sync::Arc;

use super::{
    DeviceEvent, QpRole, RdmaDest, RdmaEndpoint, RdmaError, RdmaEvent, RnicEndpointSpec,
    SendReceipt as RdmaReceipt,
};
use crate::transport::socket::{ProbeEvent, ProbeSocket, SendReceipt};
use crate::transport::{TimestampSupport, TransportError};

/// An opened RNIC endpoint: a prober and a responder UD queue pair.
pub trait RdmaDevice: Send + Sync + 'static {
    /// The port and GID the endpoint uses.
    fn spec(&self) -> &RnicEndpointSpec;
    /// The QPN of `role`'s queue pair (the responder's is registered with the mesh).
    fn qpn(&self, role: QpRole) -> u32;
    /// Completions carry NIC timestamps.
    fn nic_timestamps(&self) -> bool;
    /// Posts `payload` to `dest` from `role`'s queue pair; never blocks.
    fn send_to(
        &self,
        role: QpRole,
        payload: &[u8],
        dest: &RdmaDest,
    ) -> Result<RdmaReceipt, RdmaError>;
    /// The next datagram or send completion of `role`'s queue pair.
    fn next_event(
        &self,
        role: QpRole,
        buf: &mut [u8],
    ) -> impl Future<Output = Result<RdmaEvent, RdmaError>> + Send;
    /// The next asynchronous device event (port down/up, fatal error).
    fn next_device_event(&self) -> impl Future<Output = Result<DeviceEvent, RdmaError>> + Send;
}

impl RdmaDevice for RdmaEndpoint {
    fn spec(&self) -> &RnicEndpointSpec {
        RdmaEndpoint::spec(self)
    }

    fn qpn(&self, role: QpRole) -> u32 {
        RdmaEndpoint::qpn(self, role)
    }

    fn nic_timestamps(&self) -> bool {
        RdmaEndpoint::nic_timestamps(self)
    }

    fn send_to(
        &self,
        role: QpRole,
        payload: &[u8],
        dest: &RdmaDest,
    ) -> Result<RdmaReceipt, RdmaError> {
        RdmaEndpoint::send_to(self, role, payload, dest)
    }

    async fn next_event(&self, role: QpRole, buf: &mut [u8]) -> Result<RdmaEvent, RdmaError> {
        RdmaEndpoint::next_event(self, role, buf).await
    }

    async fn next_device_event(&self) -> Result<DeviceEvent, RdmaError> {
        RdmaEndpoint::next_device_event(self).await
    }
}

/// One queue pair of an RNIC endpoint, as a probe socket.
#[derive(Debug)]
pub struct RdmaQueuePair<D> {
    device: Arc<D>,
    role: QpRole,
}

impl<D: RdmaDevice> RdmaQueuePair<D> {
    pub fn new(device: Arc<D>, role: QpRole) -> Self {
        Self { device, role }
    }
}

impl<D: RdmaDevice> ProbeSocket for RdmaQueuePair<D> {
    type Peer = RdmaDest;

    fn timestamp_support(&self) -> TimestampSupport {
        let nic = self.device.nic_timestamps();
        TimestampSupport {
            rx: nic,
            tx: nic,
            hardware: nic,
        }
    }

    async fn send_to(&self, payload: &[u8], peer: RdmaDest) -> Result<SendReceipt, TransportError> {
        let receipt = self.device.send_to(self.role, payload, &peer)?;
        // Every RDMA send completes, stamped or not, so every send has a key.
        Ok(SendReceipt {
            host_ns: receipt.host_ns,
            tx_key: Some(receipt.tx_key),
        })
    }

    async fn next_event(&self, buf: &mut [u8]) -> Result<ProbeEvent<RdmaDest>, TransportError> {
        let event = self.device.next_event(self.role, buf).await?;
        Ok(probe_event_of(event, self.device.nic_timestamps()))
    }
}

/// What a queue pair's event means to the probe protocol. NIC stamps are
/// passed on only when the device stamps every completion (`nic_timed`), so
/// that T2..T5 of one probe never mix the NIC clock with host readings.
pub fn probe_event_of(event: RdmaEvent, nic_timed: bool) -> ProbeEvent<RdmaDest> {
    match event {
        RdmaEvent::Datagram {
            len,
            from,
            host_ns,
            nic_ns,
            truncated,
        } => ProbeEvent::Datagram {
            len,
            from,
            host_ns,
            kernel_ns: nic_ns.filter(|_| nic_timed),
            truncated,
        },
        RdmaEvent::TxTimestamp {
            key,
            nic_ns: Some(kernel_ns),
            ..
        } if nic_timed => ProbeEvent::TxTimestamp { key, kernel_ns },
        RdmaEvent::TxTimestamp { key, .. } => ProbeEvent::SendDone { key },
        RdmaEvent::SendFailed { key, status } => {
            tracing::debug!(key, status, "RDMA send completed with an error");
            ProbeEvent::SendFailed { key }
        }
        RdmaEvent::Skipped { reason } => ProbeEvent::Skipped { reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::rdma::Gid;

    fn dest() -> RdmaDest {
        RdmaDest {
            gid: Gid::from_ipv4([10, 0, 0, 2]),
            qpn: 0x22,
            flow_label: 7,
        }
    }

    #[test]
    fn nic_stamps_pass_only_from_nic_timed_devices() {
        let datagram = RdmaEvent::Datagram {
            len: 40,
            from: dest(),
            host_ns: 5,
            nic_ns: Some(9),
            truncated: false,
        };
        let ProbeEvent::Datagram {
            kernel_ns, from, ..
        } = probe_event_of(datagram, true)
        else {
            panic!("not a datagram");
        };
        assert_eq!((kernel_ns, from), (Some(9), dest()));
        let ProbeEvent::Datagram { kernel_ns, .. } = probe_event_of(datagram, false) else {
            panic!("not a datagram");
        };
        assert_eq!(kernel_ns, None);
    }

    #[test]
    fn send_completions_become_stamps_done_or_failed() {
        let stamped = RdmaEvent::TxTimestamp {
            key: 3,
            host_ns: 1,
            nic_ns: Some(77),
        };
        assert_eq!(
            probe_event_of(stamped, true),
            ProbeEvent::TxTimestamp {
                key: 3,
                kernel_ns: 77
            }
        );
        assert_eq!(
            probe_event_of(stamped, false),
            ProbeEvent::SendDone { key: 3 }
        );
        let unstamped = RdmaEvent::TxTimestamp {
            key: 4,
            host_ns: 1,
            nic_ns: None,
        };
        assert_eq!(
            probe_event_of(unstamped, true),
            ProbeEvent::SendDone { key: 4 }
        );
        assert_eq!(
            probe_event_of(RdmaEvent::SendFailed { key: 5, status: 12 }, true),
            ProbeEvent::SendFailed { key: 5 }
        );
        assert_eq!(
            probe_event_of(RdmaEvent::Skipped { reason: "x" }, true),
            ProbeEvent::Skipped { reason: "x" }
        );
    }
}
