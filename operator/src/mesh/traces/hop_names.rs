//! Names for the routers path traces cross. A trace learns addresses: a router
//! answers from one of its interfaces, not always the same one (which depends
//! on the way back to the prober). Given a map of each switch's addresses, the
//! addresses of one switch fold into its name, so the tomography sees one
//! switch and names links "spine-2 -> tor-7". Without a map, each address is
//! its own hop (links are still told apart, a switch may not be).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use pingmesh_proto::limits::is_valid_id;

/// Address -> switch name.
#[derive(Debug, Clone, Default)]
pub struct HopNames {
    by_address: HashMap<IpAddr, String>,
}

/// Why a topology map is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopNamesError {
    #[error("switch name {0:?} is not a valid identifier")]
    BadName(String),
    #[error("address {address} is given to both {first:?} and {second:?}")]
    Duplicate {
        address: IpAddr,
        first: String,
        second: String,
    },
}

impl HopNames {
    /// From `switch name -> its addresses`.
    pub fn new(switches: &BTreeMap<String, Vec<IpAddr>>) -> Result<Self, HopNamesError> {
        let mut by_address = HashMap::new();
        for (name, addresses) in switches {
            if !is_valid_id(name) {
                return Err(HopNamesError::BadName(name.clone()));
            }
            for address in addresses {
                if let Some(first) = by_address.insert(*address, name.clone()) {
                    return Err(HopNamesError::Duplicate {
                        address: *address,
                        first,
                        second: name.clone(),
                    });
                }
            }
        }
        Ok(Self { by_address })
    }

    /// Whether a map was given (then a trace's ends can be checked against the
    /// endpoints' ToRs).
    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }

    /// The switch an address belongs to, or the address itself.
    pub fn name(&self, address: IpAddr) -> String {
        self.by_address
            .get(&address)
            .cloned()
            .unwrap_or_else(|| address.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_fold_into_switch_names_and_unknown_ones_stay_addresses() {
        let map = BTreeMap::from([
            ("sp1".to_owned(), vec![ip("10.0.11.1"), ip("10.0.12.1")]),
            ("tor1".to_owned(), vec![ip("10.0.1.1")]),
        ]);
        let names = HopNames::new(&map).unwrap();
        assert_eq!(names.name(ip("10.0.12.1")), "sp1");
        assert_eq!(names.name(ip("10.0.11.1")), "sp1");
        assert_eq!(names.name(ip("10.0.1.1")), "tor1");
        assert_eq!(names.name(ip("10.9.9.9")), "10.9.9.9");
        assert!(!names.is_empty());
        assert!(HopNames::default().is_empty());
    }

    #[test]
    fn bad_names_and_addresses_given_twice_are_refused() {
        let bad = BTreeMap::from([("not a name".to_owned(), vec![ip("10.0.0.1")])]);
        assert!(matches!(
            HopNames::new(&bad),
            Err(HopNamesError::BadName(_))
        ));
        let twice = BTreeMap::from([
            ("a".to_owned(), vec![ip("10.0.0.1")]),
            ("b".to_owned(), vec![ip("10.0.0.1")]),
        ]);
        assert!(matches!(
            HopNames::new(&twice),
            Err(HopNamesError::Duplicate { .. })
        ));
    }
}
