//! The datapath programs, built twice by the agent's `build.rs` for
//! `bpfel-unknown-none`: `datapath` (the normal build) and `datapath-debug`
//! (the same programs with aya-log at debug level, one line per verdict).
//! The binaries only instantiate [`programs!`]; see `docs/architecture.md`
//! for the packet paths.
//!
//! The modules that need no kernel (header layouts and checks, checksums,
//! ARP answers, ICMP replies, rate limits) build for the host too, where
//! `cargo test -p datapath-ebpf --lib` tests them; the programs, their
//! maps and the packet they run on build for BPF only.
#![cfg_attr(not(test), no_std)]
// A 32-bit atomic add (see `clients::add_atomic`).
#![cfg_attr(target_arch = "bpf", allow(internal_features), feature(core_intrinsics))]

pub mod arp;
pub mod checksum;
pub mod headers;
pub mod icmp;
pub mod rate_limit;
pub mod related;

#[cfg(target_arch = "bpf")]
pub mod clients;
#[cfg(target_arch = "bpf")]
pub mod counters;
#[cfg(target_arch = "bpf")]
pub mod forward;
#[cfg(target_arch = "bpf")]
pub mod from_overlay;
#[cfg(target_arch = "bpf")]
pub mod from_pod;
#[cfg(target_arch = "bpf")]
pub mod from_uplink;
#[cfg(target_arch = "bpf")]
pub mod lookup;
#[cfg(target_arch = "bpf")]
pub mod maps;
#[cfg(target_arch = "bpf")]
pub mod monitor;
#[cfg(target_arch = "bpf")]
pub mod packet;
#[cfg(target_arch = "bpf")]
pub mod policy;
#[cfg(target_arch = "bpf")]
pub mod services;
#[cfg(target_arch = "bpf")]
pub mod sock;
#[cfg(target_arch = "bpf")]
pub mod strict;
#[cfg(target_arch = "bpf")]
pub mod to_pod;
#[cfg(target_arch = "bpf")]
pub mod verdict;

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Define the four TC programs and the eight socket programs, the license and the panic handler of one
/// build. `$log` says whether the build logs each verdict with aya-log: a
/// const generic, so the normal build carries no logging code at all.
#[cfg(target_arch = "bpf")]
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

        #[classifier]
        pub fn to_pod(ctx: TcContext) -> i32 {
            $crate::to_pod::run::<{ $log }>(ctx)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(connect4)]
        pub fn sock_connect4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_backend(ctx, $crate::sock::AF_INET)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(sendmsg4)]
        pub fn sock_sendmsg4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_backend(ctx, $crate::sock::AF_INET)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(recvmsg4)]
        pub fn sock_recvmsg4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_service(ctx, $crate::sock::AF_INET)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(getpeername4)]
        pub fn sock_getpeername4(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_service(ctx, $crate::sock::AF_INET)
        }

        // Dual-stack sockets to IPv4-mapped Service addresses.
        #[aya_ebpf::macros::cgroup_sock_addr(connect6)]
        pub fn sock_connect6(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_backend(ctx, $crate::sock::AF_INET6)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(sendmsg6)]
        pub fn sock_sendmsg6(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_backend(ctx, $crate::sock::AF_INET6)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(recvmsg6)]
        pub fn sock_recvmsg6(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_service(ctx, $crate::sock::AF_INET6)
        }

        #[aya_ebpf::macros::cgroup_sock_addr(getpeername6)]
        pub fn sock_getpeername6(ctx: aya_ebpf::programs::SockAddrContext) -> i32 {
            $crate::sock::to_service(ctx, $crate::sock::AF_INET6)
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
