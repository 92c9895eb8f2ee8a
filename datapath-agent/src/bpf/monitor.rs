//! The monitor's maps: the ring buffer the programs write their verdict
//! events to, and the settings they read (forward tracing, events per
//! second). One reader at a time (the `monitor` verb holds the monitor lock).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use aya::maps::{Array, MapData, RingBuf};
use datapath_common::{
    MONITOR_EVENT_VERSION, MONITOR_EVENT_VERSION_OFFSET, MonitorConfig, MonitorEvent, map_names,
};

use crate::bpf::{DatapathError, PinLayout, open_pinned};

/// The pinned ring buffer and settings of the monitor.
pub struct PinnedMonitor {
    ring: RingBuf<MapData>,
    config: Array<MapData, MonitorConfig>,
}

impl PinnedMonitor {
    pub fn open(pins: &PinLayout) -> Result<Self, DatapathError> {
        let ring = RingBuf::try_from(open_pinned(pins, map_names::MONITOR_EVENTS)?)
            .map_err(DatapathError::map(map_names::MONITOR_EVENTS))?;
        let config = Array::try_from(open_pinned(pins, map_names::MONITOR_CONFIG)?)
            .map_err(DatapathError::map(map_names::MONITOR_CONFIG))?;
        Ok(Self { ring, config })
    }

    /// Switch forward tracing on or off; returns whether it was on.
    pub fn set_trace_forwards(&mut self, on: bool) -> Result<bool, DatapathError> {
        let err = DatapathError::map(map_names::MONITOR_CONFIG);
        let found = self.config.get(&0, 0).map_err(err)?;
        if (found.trace_forwards != 0) != on {
            self.config.set(0, MonitorConfig { trace_forwards: u32::from(on), ..found }, 0).map_err(err)?;
        }
        Ok(found.trace_forwards != 0)
    }

    /// The next queued event, if any.
    pub fn next_event(&mut self) -> Option<Result<MonitorEvent, EventError>> {
        self.ring.next().map(|item| decode(&item))
    }

    /// Wait until an event is queued, at most `timeout` (a signal ends it early).
    pub fn wait(&self, timeout: Duration) {
        wait_readable(self.ring.as_fd().as_raw_fd(), timeout);
    }
}

/// An event this monitor cannot read: written by programs of another build.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error(
        "a monitor event has layout version {found}, this monitor reads version {MONITOR_EVENT_VERSION}: \
         the programs writing the ring buffer are from another build; run the `datapath-agent monitor` \
         of the agent that loaded them (docs/upgrade.md)"
    )]
    UnknownVersion { found: u8 },
    #[error(
        "a monitor event of {len} bytes, shorter than the {expected} bytes of layout version \
         {MONITOR_EVENT_VERSION}: the programs writing the ring buffer are from another build"
    )]
    Truncated { len: usize, expected: usize },
}

/// Read one ring buffer record. The version byte comes first: a record of
/// another layout is refused, never read field by field.
pub fn decode(bytes: &[u8]) -> Result<MonitorEvent, EventError> {
    // Builds from before event versions wrote 0 there, with the layout of 1.
    match bytes.get(MONITOR_EVENT_VERSION_OFFSET).copied() {
        Some(0 | MONITOR_EVENT_VERSION) => {}
        Some(found) => return Err(EventError::UnknownVersion { found }),
        None => {}
    }
    if bytes.len() < size_of::<MonitorEvent>() {
        return Err(EventError::Truncated { len: bytes.len(), expected: size_of::<MonitorEvent>() });
    }
    // SAFETY: length checked; MonitorEvent is plain data, read unaligned.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MonitorEvent>()) })
}

fn wait_readable(fd: i32, timeout: Duration) {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; an interrupted or failed poll just returns.
    unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
}

#[cfg(test)]
mod tests {
    use datapath_common::{DropReason, EVENT_DROP};

    use super::*;

    fn record(event: &MonitorEvent) -> Vec<u8> {
        // SAFETY: MonitorEvent is plain data without holes.
        unsafe {
            std::slice::from_raw_parts((event as *const MonitorEvent).cast::<u8>(), size_of::<MonitorEvent>())
        }
        .to_vec()
    }

    #[test]
    fn events_of_this_layout_and_of_builds_before_versions_are_read() {
        let event = MonitorEvent {
            timestamp_ns: 7,
            ifindex: 3,
            kind: EVENT_DROP,
            code: DropReason::SpoofedSource as u8,
            version: MONITOR_EVENT_VERSION,
            ..MonitorEvent::default()
        };
        assert_eq!(decode(&record(&event)), Ok(event));
        let before_versions = MonitorEvent { version: 0, ..event };
        assert_eq!(decode(&record(&before_versions)), Ok(before_versions));
    }

    #[test]
    fn an_event_of_another_layout_is_refused_by_its_version() {
        let mut bytes = record(&MonitorEvent { version: MONITOR_EVENT_VERSION, ..MonitorEvent::default() });
        bytes[MONITOR_EVENT_VERSION_OFFSET] = MONITOR_EVENT_VERSION + 1;
        let err = decode(&bytes).unwrap_err();
        assert_eq!(err, EventError::UnknownVersion { found: MONITOR_EVENT_VERSION + 1 });
        let message = err.to_string();
        assert!(message.contains("layout version 2") && message.contains("another build"), "{message}");
        // A longer record of a newer layout is refused too, not read as far as it fits.
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(decode(&bytes), Err(EventError::UnknownVersion { .. })));
        let short =
            &record(&MonitorEvent { version: MONITOR_EVENT_VERSION, ..MonitorEvent::default() })[..36];
        assert!(matches!(decode(short), Err(EventError::Truncated { len: 36, .. })));
    }
}
