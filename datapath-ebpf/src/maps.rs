//! The maps, declared as BTF maps so `bpftool map dump` shows field names.
//! Names and sizes come from `datapath-common`, shared with the agent.

use aya_ebpf::{
    btf_maps::{HashMap, PerCpuArray},
    macros::btf_map,
};
use datapath_common::{
    DROP_COUNTER_SLOTS, DropReason, Endpoint, EndpointKey, FORWARD_COUNTER_SLOTS, ForwardPath,
    MAX_LOCAL_ENDPOINTS, PodInterface,
};

#[btf_map]
pub static ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_LOCAL_ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map]
pub static POD_INTERFACES: HashMap<u32, PodInterface, { MAX_LOCAL_ENDPOINTS as usize }> =
    HashMap::new();

#[btf_map]
pub static DROP_COUNTERS: PerCpuArray<u64, { DROP_COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static FORWARD_COUNTERS: PerCpuArray<u64, { FORWARD_COUNTER_SLOTS as usize }> =
    PerCpuArray::new();

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(slot) = DROP_COUNTERS.get_ptr_mut(reason as u32) {
        // Per-CPU slot: no other writer, a plain add is race-free.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count_forward(path: ForwardPath) {
    if let Some(slot) = FORWARD_COUNTERS.get_ptr_mut(path as u32) {
        unsafe { *slot += 1 };
    }
}
