//! Peers that send in the other routing mode black-hole each other's pod
//! traffic: one node encapsulates, the other expects plain packets (or the
//! reverse). The programs drop such packets as `peer_mode_mismatch` and
//! note the peer; this watcher turns that into a log line an operator can
//! act on, once per peer and burst, not once per packet.

use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use crate::{
    config::Mode,
    datapath::{PinLayout, PinnedMaps},
};

/// How often the programs' notes are read.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Read the notes every [`CHECK_INTERVAL`] and warn about each peer whose
/// count grew since the last look.
pub fn spawn_watch(pins: PinLayout, mode: Mode) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: HashMap<Ipv4Addr, u64> = HashMap::new();
        let mut interval = tokio::time::interval(CHECK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let peers = match PinnedMaps::open(&pins).and_then(|maps| maps.peer_mode_mismatches()) {
                Ok(peers) => peers,
                Err(e) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(e)),
                        "reading the peer mode mismatch map failed"
                    );
                    continue;
                }
            };
            for (peer, mismatch) in peers {
                let before = seen.insert(peer, mismatch.packets).unwrap_or(0);
                if mismatch.packets > before {
                    let (ours, theirs) = match mode {
                        Mode::Native => ("native", "vxlan (it sends VXLAN)"),
                        Mode::Vxlan => ("vxlan", "native (it sends plain pod traffic)"),
                    };
                    tracing::warn!(
                        peer = %peer,
                        packets = mismatch.packets - before,
                        this_node = ours,
                        peer_mode = theirs,
                        "a peer node runs the other routing mode (or a host forges its pods' traffic): \
                         its packets are dropped as peer_mode_mismatch; set the same `mode` on every node"
                    );
                }
            }
        }
    })
}
