//! The RDMA transport where it cannot exist (not Linux, or built without the
//! `rdma` feature): the same API, every operation [`RdmaError::Unsupported`].

use std::convert::Infallible;

use super::{
    Availability, DeviceEvent, QpRole, RdmaConfig, RdmaDest, RdmaError, RdmaEvent,
    RnicEndpointSpec, SendReceipt,
};

const WHAT: &str = "the RDMA transport (needs Linux and the `rdma` feature)";

/// Never available in this build.
pub fn rdma_available() -> Availability {
    Availability::Unavailable {
        reason: format!("{WHAT} is not part of this build"),
    }
}

/// An RNIC endpoint; cannot be opened in this build.
#[derive(Debug)]
pub struct RdmaEndpoint {
    never: Infallible,
}

impl RdmaEndpoint {
    /// Always [`RdmaError::Unsupported`].
    pub fn open(_config: &RdmaConfig) -> Result<Self, RdmaError> {
        Err(RdmaError::Unsupported { what: WHAT })
    }

    pub fn spec(&self) -> &RnicEndpointSpec {
        match self.never {}
    }

    pub fn qpn(&self, _role: QpRole) -> u32 {
        match self.never {}
    }

    pub fn nic_timestamps(&self) -> bool {
        match self.never {}
    }

    pub fn send_to(
        &self,
        _role: QpRole,
        _payload: &[u8],
        _dest: &RdmaDest,
    ) -> Result<SendReceipt, RdmaError> {
        match self.never {}
    }

    #[allow(clippy::unused_async)]
    pub async fn next_event(&self, _role: QpRole, _buf: &mut [u8]) -> Result<RdmaEvent, RdmaError> {
        match self.never {}
    }

    #[allow(clippy::unused_async)]
    pub async fn next_device_event(&self) -> Result<DeviceEvent, RdmaError> {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::rdma::Gid;

    #[test]
    fn opening_an_endpoint_is_unsupported_not_a_panic() {
        let spec = RnicEndpointSpec {
            endpoint_id: "n/mlx5_0-p1".to_owned(),
            device: "mlx5_0".to_owned(),
            port: 1,
            gid_index: 3,
            gid: Gid::from_ipv4([10, 0, 0, 1]),
            netdev: None,
            port_active: true,
        };
        let err = RdmaEndpoint::open(&RdmaConfig::new(spec)).unwrap_err();
        assert_eq!(err.category(), "unsupported");
    }

    #[test]
    fn rdma_is_reported_unavailable() {
        assert!(matches!(rdma_available(), Availability::Unavailable { .. }));
    }
}
