//! Peers that send in the other routing mode black-hole each other's pod
//! traffic: one node encapsulates, the other expects plain packets (or the
//! reverse). The programs drop such packets as `peer_mode_mismatch` and
//! note the peer; this watcher turns each note into a log line an operator
//! can act on, once per peer and burst, not once per packet, and then
//! removes it: a note is logged once (a restart does not tell old history
//! again), and the line is worded by the mode this node had when the
//! packets came (a note does not record it).

use std::time::Duration;

use crate::{
    bpf::{DatapathError, PinLayout, PinnedModeMismatches},
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
    let mut notes = PinnedModeMismatches::open(pins)?;
    for (peer, mismatch) in notes.notes()? {
        let (ours, theirs) = match mode {
            Mode::Native => ("native", "vxlan (it sends VXLAN)"),
            Mode::Vxlan => ("vxlan", "native (it sends plain pod traffic)"),
        };
        tracing::warn!(
            %peer,
            packets = mismatch.packets,
            this_node = ours,
            peer_mode = theirs,
            "a peer node runs the other routing mode (or a host forges its pods' traffic): \
             its packets are dropped as peer_mode_mismatch; set the same `mode` on every node"
        );
        notes.forget(peer)?;
    }
    Ok(())
}
