//! The datapath programs, built twice by the agent's `build.rs` for
//! `bpfel-unknown-none`: `datapath` (the normal build) and `datapath-debug`
//! (the same programs with aya-log at debug level, one line per verdict).
//! The binaries only instantiate [`programs!`]; see `docs/architecture.md`
//! for the packet paths.
#![no_std]
// Only the BPF build has programs: on the host (the agent's build-dependency,
// there so cargo rebuilds the agent when this crate changes) the library is empty.
#![cfg(target_arch = "bpf")]

pub mod arp;
pub mod checksum;
pub mod counters;
pub mod forward;
pub mod from_overlay;
pub mod from_pod;
pub mod from_uplink;
pub mod headers;
pub mod icmp;
pub mod lookup;
pub mod maps;
pub mod monitor;
pub mod packet;
pub mod rate_limit;
pub mod services;
pub mod strict;
pub mod verdict;

/// Define the three TC programs, the license and the panic handler of one
/// build. `$log` says whether the build logs each verdict with aya-log: a
/// const generic, so the normal build carries no logging code at all.
#[macro_export]
macro_rules! programs {
    (log = $log:expr) => {
        use aya_ebpf::{macros::classifier, programs::TcContext};

        #[classifier]
        pub fn from_pod(ctx: TcContext) -> i32 {
            $crate::from_pod::run::<{ $log }>(ctx)
        }

        #[classifier]
        pub fn from_uplink(ctx: TcContext) -> i32 {
            $crate::from_uplink::run::<{ $log }>(ctx)
        }

        #[classifier]
        pub fn from_overlay(ctx: TcContext) -> i32 {
            $crate::from_overlay::run::<{ $log }>(ctx)
        }

        #[cfg(not(test))]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            // The verifier rejects any reachable panic path; this is never called.
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}
