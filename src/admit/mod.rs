//! Stages 1 and 2, admission: caps taken as RAII permits before any byte is
//! read, and the per-IP handshake rate.
//!
//! Dropping a permit, wherever the connection ends, releases its slot: no
//! code path has to remember to give a cap back.

pub mod caps;
pub mod rate;
pub mod slots;

use std::net::IpAddr;

pub use caps::{Caps, ConnPermit, IpPermit};
pub use rate::RateLimiter;
pub use slots::{HandshakePermit, SlotLimits, Slots};

/// The unit per-IP limits count: an IPv4 address, or an IPv6 /64 (one
/// subscriber's allocation; counting single v6 addresses would let one host
/// rotate through 2^64 of them).
///
/// Held as plain integers (16 bytes, where an `IpAddr` takes 17 and so 24
/// in a struct): every connection carries it in its permits for its whole
/// life, in the connection task's reserved room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpKey {
    V4(u32),
    /// The upper 64 bits of the address.
    V6(u64),
}

impl IpKey {
    pub fn new(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(u32::from(v4)),
                None => IpKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_keyed_per_64_and_mapped_v4_as_v4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(IpKey::new(a), IpKey::new(b));
        assert_ne!(IpKey::new(a), IpKey::new(c));
        let m: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(IpKey::new(m), IpKey::new("127.0.0.2".parse().unwrap()));
    }
}
