//! Small helpers over aya's hash maps.

use std::borrow::BorrowMut;

use aya::maps::{HashMap, MapData, MapError};

/// `map.get(key)`, with an absent key as `None`.
pub(super) fn get_present<T: std::borrow::Borrow<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
    key: &K,
) -> Result<Option<V>, MapError> {
    match map.get(key, 0) {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `map.remove(key)`; false if it was not there (the programs or another
/// sweep removed it first).
pub(super) fn remove_present<T: BorrowMut<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<T, K, V>,
    key: &K,
) -> Result<bool, MapError> {
    match map.remove(key) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the map holds any entry (one syscall, whatever its size).
pub(super) fn has_entries<T: std::borrow::Borrow<MapData>, K: aya::Pod, V: aya::Pod>(
    map: &HashMap<T, K, V>,
) -> Result<bool, MapError> {
    map.keys().next().transpose().map(|key| key.is_some())
}
