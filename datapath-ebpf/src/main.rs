//! TC programs of the pod datapath. Built for `bpfel-unknown-none` by the
//! agent's `build.rs`; see `docs/architecture.md` for the packet paths.
#![no_std]
#![no_main]

mod forward;
mod from_overlay;
mod from_pod;
mod from_uplink;
mod maps;
mod packet;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path; this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
