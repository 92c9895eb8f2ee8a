//! Socket-level load balancing for the node's own sockets (the node's
//! processes, hostNetwork pods): cgroup sock_addr hooks on the root cgroup.
//! A connect() or sendmsg() to a Service address is sent straight to a
//! backend, so its packets need no translation at all; recvmsg() and
//! getpeername() show the Service address again, so the application only
//! ever sees the Service. Pods keep the TC path: their sockets are in other
//! network namespaces, which these programs leave alone (a cgroup spans
//! namespaces; the node's is told by its cookie).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns,
        bpf_set_retval,
    },
    programs::SockAddrContext,
};
use datapath_common::{
    IPPROTO_TCP, IPPROTO_UDP, NODE_FLAG_SERVICES, SERVICE_SCOPE_CLUSTER, ServiceKey, SockRevNat,
    SockRevNatKey,
};

use crate::{
    lookup::node_config,
    maps::{SERVICES, SOCK_REVNAT},
    services::choose_backend,
};

/// What a sock_addr program returns: let the call go on, or fail it (with
/// the error set by `bpf_set_retval`, EPERM otherwise).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// The hooks' address families.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
const ECONNREFUSED: i32 = 111;

/// The first 12 bytes of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as the three words of `user_ip6` hold them.
const V4_MAPPED: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// The call's IPv4 address and port, as they sit in packets (network
/// order): of an AF_INET call, or of an AF_INET6 call to an IPv4-mapped
/// address (a dual-stack socket, as Java's and many others' are); `None`
/// for anything else.
#[inline(always)]
fn destination(addr: &bpf_sock_addr, family: u32) -> Option<([u8; 4], [u8; 2])> {
    if addr.user_family != family {
        return None;
    }
    // user_port holds the port's two network-order bytes in its low half.
    let port = (addr.user_port as u16).to_ne_bytes();
    if family == AF_INET {
        return Some((addr.user_ip4.to_ne_bytes(), port));
    }
    // Each word read on its own: the kernel allows 4-byte reads of user_ip6.
    let (w0, w1, w2) = (addr.user_ip6[0], addr.user_ip6[1], addr.user_ip6[2]);
    if [w0, w1, w2] != V4_MAPPED {
        return None;
    }
    Some((addr.user_ip6[3].to_ne_bytes(), port))
}

#[inline(always)]
fn set_destination(addr: &mut bpf_sock_addr, family: u32, ipv4: [u8; 4], port: [u8; 2]) {
    if family == AF_INET {
        addr.user_ip4 = u32::from_ne_bytes(ipv4);
    } else {
        addr.user_ip6[3] = u32::from_ne_bytes(ipv4);
    }
    addr.user_port = u16::from_ne_bytes(port) as u32;
}

/// Is this a socket of the node's own namespace, with Services on?
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let config = node_config();
    if config.flags & NODE_FLAG_SERVICES == 0 || config.host_netns_cookie == 0 {
        return false;
    }
    // SAFETY: a helper on the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) == config.host_netns_cookie }
}

/// connect() and sendmsg() (`family`: the hook's, AF_INET or AF_INET6): a
/// Service address becomes one of its backends. What the socket asked for
/// is remembered, for its replies and getpeername().
#[inline(always)]
pub fn to_backend(ctx: SockAddrContext, family: u32) -> i32 {
    if !ours(&ctx) {
        return ALLOW;
    }
    // SAFETY: the context the kernel gave this program.
    let addr = unsafe { &mut *ctx.sock_addr };
    let protocol = addr.protocol as u8;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return ALLOW;
    }
    let Some((vip, port)) = destination(addr, family) else {
        return ALLOW;
    };
    let key = ServiceKey { vip, port, protocol, scope: SERVICE_SCOPE_CLUSTER };
    // SAFETY: copied out at once.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: plain helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Host clients share the node's address: that is their ClientIP.
    let backend = match service.backend_count {
        0 => None,
        // (A socket's choice is kept by the socket: at random.)
        // SAFETY: plain helper without arguments.
        _ => choose_backend(&service, node_config().node_ipv4, now, unsafe { bpf_get_prandom_u32() }),
    };
    let Some(backend) = backend else {
        // As a refused connection, at once (kube-proxy rejects too).
        // SAFETY: plain helper taking a value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    // SAFETY: a helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let reverse =
        SockRevNatKey { cookie, backend_ipv4: backend.ipv4, backend_port: backend.port, _pad: [0; 2] };
    // Full (LRU): the oldest goes; a socket that loses its entry sees its
    // replies come from the backend, as without socket LB.
    let _ = SOCK_REVNAT.insert(reverse, SockRevNat { vip, port, _pad: [0; 2] }, 0);
    set_destination(addr, family, backend.ipv4, backend.port);
    ALLOW
}

/// recvmsg() and getpeername(): a backend's address becomes the Service
/// address the socket asked for.
#[inline(always)]
pub fn to_service(ctx: SockAddrContext, family: u32) -> i32 {
    if !ours(&ctx) {
        return ALLOW;
    }
    // SAFETY: the context the kernel gave this program.
    let addr = unsafe { &mut *ctx.sock_addr };
    let Some((ipv4, port)) = destination(addr, family) else {
        return ALLOW;
    };
    // SAFETY: a helper on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let key = SockRevNatKey { cookie, backend_ipv4: ipv4, backend_port: port, _pad: [0; 2] };
    // SAFETY: copied out at once.
    if let Some(service) = (unsafe { SOCK_REVNAT.get(key) }).copied() {
        set_destination(addr, family, service.vip, service.port);
    }
    ALLOW
}
