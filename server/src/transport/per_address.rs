//! Connections per source address: a slot per open connection, counted by IP,
//! so one address cannot take every connection of the server.
//!
//! Addresses are counted exactly (an IPv6 /64 counts as its many addresses).
//! Behind a proxy every connection comes from the proxy's address: raise the limit
//! there, and limit per client in the proxy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Open connections by source address, at most `max` each.
#[derive(Debug)]
pub struct PerAddress {
    counts: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One connection's place in its address's count; freed on drop.
#[derive(Debug)]
pub struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// No connections yet; at most `max` per address.
    pub fn new(max: usize) -> Arc<Self> {
        assert!(
            max > 0,
            "a per-address limit admits at least one connection"
        );
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A slot for one more connection from `ip`, or `None` when `ip` holds `max`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().expect("per-address counts");
        let count = counts.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: Arc::clone(self),
            ip,
        })
    }

    /// Connections open from `ip` now.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        let counts = self.counts.lock().expect("per-address counts");
        counts.get(&ip).copied().unwrap_or(0)
    }

    /// Addresses with a connection open now.
    pub fn addresses(&self) -> usize {
        self.counts.lock().expect("per-address counts").len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().expect("per-address counts");
        let count = counts
            .get_mut(&self.ip)
            .expect("a slot's address is counted");
        debug_assert!(*count > 0);
        *count -= 1;
        if *count == 0 {
            counts.remove(&self.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_at_most_its_share() {
        let table = PerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "::1".parse().unwrap());
        let first = table.admit(a).unwrap();
        let _second = table.admit(a).unwrap();
        assert!(table.admit(a).is_none(), "a third from the same address");
        assert!(
            table.admit(b).is_some(),
            "another address has its own share"
        );
        drop(first);
        assert_eq!(table.open_from(a), 1);
        let third = table.admit(a);
        assert!(third.is_some(), "a closed connection frees its place");
        drop(third);
        drop(_second);
        assert_eq!(table.open_from(a), 0);
        assert_eq!(
            table.addresses(),
            0,
            "nothing kept for addresses with no connection"
        );
    }
}
