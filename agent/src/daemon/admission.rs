//! Which peer connections the agent takes on. Anyone who can reach the listen port can open
//! connections, and each holds a socket (a file descriptor) until it proves something: a TLS
//! connection until its handshake proves a trusted peer (within 10 s), a data stream until its
//! session takes it (from then on `net::stream_init` bounds them per session). Without a cap a
//! flood of them would take the descriptors the control socket, the journal and QEMU's sockets
//! need, and one host could take every place the others need: so there is a cap in all and one
//! per peer address (per /64 for IPv6, which hands a host a whole /64). Trusted sessions do not
//! count, and an address with a trusted session under way is taken on past the cap in all (its
//! own cap still holds): a flood from elsewhere, which can fill the cap in all from a few
//! addresses, cannot shut out the migrations under way, nor the data streams they open right
//! after their handshake (off-path parties must not end a session, SPEC.md §2.3); it only
//! delays new peers while it lasts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Peer connections handled at once.
pub const MAX_PEER_CONNECTIONS: usize = 512;

/// Of them, from one address: twice the most migrations one source may start at once
/// (`transfer.max_concurrent_migrations`), each with a TLS handshake and a first data stream
/// on their way at the same moment.
pub const MAX_PER_ADDRESS: usize = 2 * crate::config::MAX_CONCURRENT;

/// The connections held, in all and per address.
#[derive(Default)]
pub struct Admission {
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
    /// Trusted sessions under way, by the address they came from.
    trusted: HashMap<IpAddr, usize>,
}

/// Why a connection was not taken on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// `MAX_PEER_CONNECTIONS` are open.
    Total,
    /// `MAX_PER_ADDRESS` are open from this address.
    Address,
}

/// A connection taken on; its slot is released when this is dropped.
pub struct Slot {
    admission: Arc<Admission>,
    addr: IpAddr,
}

/// The address a connection counts against: an IPv6 address's /64.
fn counted_as(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
        v4 => v4,
    }
}

impl Admission {
    /// A slot for a connection from `addr`, or why there is none.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<Slot, Full> {
        let addr = counted_as(addr);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.total >= MAX_PEER_CONNECTIONS && !held.trusted.contains_key(&addr) {
            return Err(Full::Total);
        }
        let n = held.by_addr.entry(addr).or_default();
        if *n >= MAX_PER_ADDRESS {
            return Err(Full::Address);
        }
        *n += 1;
        held.total += 1;
        Ok(Slot {
            admission: self.clone(),
            addr,
        })
    }
}

/// A trusted session from an address, under way: that address is taken on past the cap in
/// all while this lives.
pub struct Trusted {
    admission: Arc<Admission>,
    addr: IpAddr,
}

impl Slot {
    /// The connection proved a trusted peer (its TLS handshake): it no longer counts, and its
    /// address is taken on past the cap in all while the session lasts.
    pub fn into_trusted(self) -> Trusted {
        let trusted = Trusted {
            admission: self.admission.clone(),
            addr: self.addr,
        };
        let mut held = (self.admission.held.lock()).unwrap_or_else(|e| e.into_inner());
        *held.trusted.entry(self.addr).or_default() += 1;
        drop(held);
        trusted
    }
}

impl Drop for Trusted {
    fn drop(&mut self) {
        let mut held = (self.admission.held.lock()).unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.trusted.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                held.trusted.remove(&self.addr);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = (self.admission.held.lock()).unwrap_or_else(|e| e.into_inner());
        held.total -= 1;
        if let Some(n) = held.by_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                held.by_addr.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    /// A flood from several addresses fills the cap in all; the address of a trusted session
    /// under way still gets its data streams in (up to its own cap), until that session ends.
    #[test]
    fn a_flood_cannot_shut_out_a_trusted_sessions_streams() {
        let a = Arc::new(Admission::default());
        let control = a.admit(ip(200)).expect("the source's control connection");
        let flood: Vec<Slot> = (0..MAX_PEER_CONNECTIONS - 1)
            .map(|i| a.admit(ip((i / MAX_PER_ADDRESS) as u8)).expect("flood"))
            .collect();
        assert_eq!(
            a.admit(ip(201)).err(),
            Some(Full::Total),
            "a new peer waits"
        );
        assert_eq!(a.admit(ip(200)).err(), Some(Full::Total), "not trusted yet");
        let session = control.into_trusted();
        // The control connection's place, freed, goes to the flood too.
        let refill = a.admit(ip(250)).expect("the freed place");
        let streams: Vec<Slot> = (0..MAX_PER_ADDRESS)
            .map(|_| a.admit(ip(200)).expect("the trusted session's stream"))
            .collect();
        assert_eq!(
            a.admit(ip(200)).err(),
            Some(Full::Address),
            "its own cap holds"
        );
        assert_eq!(a.admit(ip(201)).err(), Some(Full::Total));
        drop(streams);
        drop(session);
        assert_eq!(a.admit(ip(200)).err(), Some(Full::Total), "session over");
        drop((flood, refill));
        assert!(a.admit(ip(201)).is_ok());
        assert!(a.held.lock().unwrap().trusted.is_empty());
    }

    #[test]
    fn one_address_cannot_take_every_slot_and_slots_come_back() {
        let a = Arc::new(Admission::default());
        let mine: Vec<Slot> = (0..MAX_PER_ADDRESS)
            .map(|_| a.admit(ip(1)).expect("admit"))
            .collect();
        assert_eq!(a.admit(ip(1)).err(), Some(Full::Address));
        // Another host still gets in.
        let other = a.admit(ip(2)).expect("another address");
        drop(mine);
        assert!(a.admit(ip(1)).is_ok(), "released on drop");
        drop(other);
        assert!(a.held.lock().unwrap().by_addr.is_empty());
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let a = Arc::new(Admission::default());
        let host = |i: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, i]);
        let mine: Vec<Slot> = (0..MAX_PER_ADDRESS as u16)
            .map(|i| a.admit(host(i)).expect("admit"))
            .collect();
        assert_eq!(a.admit(host(9999)).err(), Some(Full::Address));
        assert!(a
            .admit(IpAddr::from([0x2001, 0xdb8, 0, 2, 0, 0, 0, 1]))
            .is_ok());
        // An IPv4-mapped address counts as the IPv4 one.
        let v4 = IpAddr::from([192, 0, 2, 7]);
        let mapped = IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0207]);
        assert_eq!(counted_as(mapped), v4);
        drop(mine);
    }

    #[test]
    fn the_total_is_capped_across_addresses() {
        let a = Arc::new(Admission::default());
        let per = MAX_PER_ADDRESS;
        let hosts = MAX_PEER_CONNECTIONS / per;
        let slots: Vec<Slot> = (0..hosts)
            .flat_map(|h| (0..per).map(move |_| h))
            .map(|h| a.admit(ip(h as u8)).expect("admit"))
            .collect();
        assert_eq!(slots.len(), MAX_PEER_CONNECTIONS);
        assert_eq!(a.admit(ip(200)).err(), Some(Full::Total));
        drop(slots);
        assert_eq!(a.held.lock().unwrap().total, 0);
        assert!(a.admit(ip(200)).is_ok());
    }
}
