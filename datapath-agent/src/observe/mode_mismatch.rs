//! Peers that send in the other routing mode black-hole each other's pod
//! traffic: one node encapsulates, the other expects plain packets (or the
//! reverse). The programs drop such packets as `peer_mode_mismatch` and
//! note the peer; this watcher turns each note into a log line an operator
//! can act on, once per peer and burst, not once per packet, and then
//! removes it: a note is logged once (a restart does not tell old history
//! again), and the line is worded by the mode this node had when the
//! packets came (a note does not record it).

use std::{net::Ipv4Addr, time::Duration};

use aya::maps::{HashMap, MapData};
use datapath_common::{ModeMismatch, NodeKey, map_names};

use crate::{
    bpf::{DatapathError, PinLayout, open_pinned},
    model::Mode,
};

/// How often the programs' notes are read.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Read the notes every [`CHECK_INTERVAL`], warn about each peer noted and
/// remove its note. The first look is at notes made before this agent
/// started, with the mode the node had then (`mode_before`, when known);
/// every later one with `mode`.
pub fn spawn_watch(pins: PinLayout, mode_before: Option<Mode>, mode: Mode) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(CHECK_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut mode_of_notes = mode_before.unwrap_or(mode);
        loop {
            interval.tick().await;
            if let Err(e) = log_and_forget(&pins, mode_of_notes) {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(e)),
                    "reading the peer mode mismatch map failed"
                );
                continue;
            }
            mode_of_notes = mode;
        }
    })
}

fn log_and_forget(pins: &PinLayout, mode: Mode) -> Result<(), DatapathError> {
    let name = map_names::PEER_MODE_MISMATCHES;
    let map_err = DatapathError::map(name);
    let mut notes: HashMap<MapData, NodeKey, ModeMismatch> =
        HashMap::try_from(open_pinned(pins, name)?).map_err(map_err)?;
    let noted: Vec<(NodeKey, ModeMismatch)> = notes.iter().collect::<Result<_, _>>().map_err(map_err)?;
    for (key, mismatch) in noted {
        let (ours, theirs) = match mode {
            Mode::Native => ("native", "vxlan (it sends VXLAN)"),
            Mode::Vxlan => ("vxlan", "native (it sends plain pod traffic)"),
        };
        tracing::warn!(
            peer = %Ipv4Addr::from(key.ipv4),
            packets = mismatch.packets,
            this_node = ours,
            peer_mode = theirs,
            "a peer node runs the other routing mode (or a host forges its pods' traffic): \
             its packets are dropped as peer_mode_mismatch; set the same `mode` on every node"
        );
        // Packets counted since the read above go with it: the peer's next
        // ones make a new note.
        match notes.remove(&key) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(map_err(e)),
        }
    }
    Ok(())
}
