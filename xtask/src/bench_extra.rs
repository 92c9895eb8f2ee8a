//! The bench suites beyond packets on the wire: the per-packet cost of each
//! program path (BPF_PROG_TEST_RUN), the control plane at scale, and the
//! targets every figure is held against.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions};
use datapath_agent::{bpf::Datapath, model::RemoteRoute};
use datapath_common::{Endpoint, NodeConfig, PodInterface, RoutingMode, program_names};
use datapath_tests::{
    lab::{Netns, Node},
    packets::{ETH_P_IP, Ipv4, RUN_DEVICE_IP, RunDevice, arp_request, ethernet, skb_context},
};

use crate::bench::{Stats, stats};

const POD_A: [u8; 4] = [10, 244, 1, 10];
const POD_B: [u8; 4] = [10, 244, 1, 11];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 7];
const MAC_A: [u8; 6] = [2, 0xaa, 0, 0, 0, 10];
const HOST_MAC_A: [u8; 6] = [2, 0xee, 0, 0, 0, 10];
const PEER_MAC: [u8; 6] = [2, 0x99, 0, 0, 0, 2];

/// A datapath with private maps: pod A (on the run device, which is also
/// the uplink) and pod B local, 10.244.2.0/24 on a peer node, in `mode`.
fn datapath(mode: RoutingMode, device: &RunDevice) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load_unpinned()?;
    dp.insert_pod_interface(
        device.ifindex,
        PodInterface { pod_ipv4: POD_A, host_mac: HOST_MAC_A, isolation: 0, _pad: 0, traffic_slot: 0 },
    )?;
    dp.insert_endpoint(
        Ipv4Addr::from(POD_B),
        Endpoint {
            host_ifindex: 4242,
            pod_mac: [2, 0xaa, 0, 0, 0, 11],
            host_mac: [2, 0xee, 0, 0, 0, 11],
            flags: 0,
            traffic_slot: 1,
        },
    )?;
    dp.set_node_config(NodeConfig {
        node_ipv4: RUN_DEVICE_IP,
        mode: mode as u32,
        uplink_ifindex: device.ifindex,
        vxlan_ifindex: device.ifindex,
        vni: 1,
        flags: 0,
        pod_cidr: [10, 244, 1, 0],
        pod_prefix_len: 24,
        ..NodeConfig::default()
    })?;
    dp.sync_remote_nodes(&[RemoteRoute {
        pod_cidr: "10.244.2.0/24".parse()?,
        node_ip: Ipv4Addr::new(192, 0, 2, 2),
    }])?;
    Ok(dp)
}

/// An ICMP echo from pod A. TTL 255: a test run feeds the program the same
/// buffer on every repeat, and each forward decrements the TTL.
fn frame(dst: [u8; 4]) -> Vec<u8> {
    let mut ip = Ipv4::icmp_echo(POD_A, dst);
    ip.ttl = 255;
    ethernet(HOST_MAC_A, MAC_A, ETH_P_IP, &ip.bytes())
}

/// A TCP ACK without data from pod A to `dst`, TTL 255 as above.
fn tcp_frame(dst: [u8; 4]) -> Vec<u8> {
    let mut ip = Ipv4::tcp(POD_A, 40000, dst, 80, datapath_tests::packets::TCP_ACK, b"");
    ip.ttl = 255;
    ethernet(HOST_MAC_A, MAC_A, ETH_P_IP, &ip.bytes())
}

/// An ICMP echo from a remote pod to pod B, as the peer node puts it on
/// the uplink (the run device). TTL 255, as above.
fn uplink_frame() -> Vec<u8> {
    let mut ip = Ipv4::icmp_echo(REMOTE_POD, POD_B);
    ip.ttl = 255;
    ethernet(HOST_MAC_A, PEER_MAC, ETH_P_IP, &ip.bytes())
}

/// The figures of one program path: raw ns/packet, and net of the test-run
/// harness (the same frame and repeat count through an empty program, in
/// the same round).
pub(crate) struct ProgramPath {
    pub name: &'static str,
    pub raw: Stats,
    pub net: Stats,
    /// The empty program, same frame and repeats per run.
    pub harness: Stats,
    pub per_run: u32,
}

/// One measured path and the counter that proves the packets took it.
struct Case {
    name: &'static str,
    mode: RoutingMode,
    program: &'static str,
    packet: Vec<u8>,
    /// Repeats per test run: the program rewrites the buffer in place (TTL,
    /// ARP reply), so a run may only repeat while the path stays the same.
    per_run: u32,
    /// `forward/<path>` or `drop/<reason>`, which must count every packet.
    counts_as: &'static str,
    /// What the path needs in the maps besides the two pods and the peer.
    setup: Setup,
}

/// Extra map content for a path.
#[derive(Clone, Copy)]
enum Setup {
    None,
    /// NetworkPolicy isolates both pods and allows A -> B (any protocol),
    /// with this many other rules in the trie: an ICMP echo is judged
    /// once, then tracked.
    PolicyAllowed {
        filler: usize,
    },
    /// As allowed, but A's egress allows only UDP 53 to B: a TCP segment
    /// (not a SYN: dropped without an answer, the buffer unchanged) is
    /// judged on every repeat.
    PolicyDenied {
        filler: usize,
    },
    /// This many ClusterIP Services (TCP, one backend each) programmed, so
    /// the programs translate: every TCP or UDP packet of a pod looks for
    /// its connection and for a Service, as on any node of a real cluster.
    Services {
        count: u32,
    },
}

/// ns/packet of each program path: `rounds` rounds of `count` packets, each
/// round running every path once (so a noisy moment hits all of them alike),
/// on one pinned CPU, each next to the empty program's cost in that round.
/// Fails if a path's packets did not all take it (counted by the datapath).
/// `only`: just the path of that name (to profile it alone with perf).
pub(crate) fn program_paths(
    count: u32,
    rounds: usize,
    only: Option<&str>,
) -> anyhow::Result<Vec<ProgramPath>> {
    let case = |name, mode, program, packet, per_run, counts_as| Case {
        name,
        mode,
        program,
        packet,
        per_run,
        counts_as,
        setup: Setup::None,
    };
    let cases = [
        case(
            "local delivery",
            RoutingMode::Native,
            program_names::FROM_POD,
            frame(POD_B),
            250,
            "forward/local_delivery",
        ),
        // From a remote pod: the forwarding checks (MAC, header, martian,
        // own-CIDR and reverse-path source) and delivery.
        case(
            "uplink delivery",
            RoutingMode::Native,
            program_names::FROM_UPLINK,
            uplink_frame(),
            250,
            "forward/local_delivery",
        ),
        case(
            "remote native",
            RoutingMode::Native,
            program_names::FROM_POD,
            frame(REMOTE_POD),
            250,
            "forward/to_remote_native",
        ),
        case(
            "remote overlay",
            RoutingMode::Vxlan,
            program_names::FROM_POD,
            frame(REMOTE_POD),
            250,
            "forward/to_remote_overlay",
        ),
        // Test runs cannot attach tunnel metadata: this is the drop path.
        case(
            "overlay ingress (no tunnel key)",
            RoutingMode::Vxlan,
            program_names::FROM_OVERLAY,
            frame(POD_B),
            250,
            "drop/no_tunnel_key",
        ),
        // The reply overwrites the request: one packet per run.
        case(
            "ARP reply",
            RoutingMode::Native,
            program_names::FROM_POD,
            arp_request(MAC_A, POD_A, [169, 254, 1, 1]),
            1,
            "forward/arp_reply",
        ),
        // TCP between two pods (an ACK, so nothing is opened), without and
        // with Services programmed: what the Service lookups add to every
        // TCP packet of a pod in a cluster that has Services.
        case(
            "local delivery, TCP",
            RoutingMode::Native,
            program_names::FROM_POD,
            tcp_frame(POD_B),
            250,
            "forward/local_delivery",
        ),
        Case {
            setup: Setup::Services { count: 1_000 },
            ..case(
                "local delivery, TCP, 1k Services",
                RoutingMode::Native,
                program_names::FROM_POD,
                tcp_frame(POD_B),
                250,
                "forward/local_delivery",
            )
        },
        case(
            "pass to host",
            RoutingMode::Native,
            program_names::FROM_POD,
            frame([198, 51, 100, 9]),
            250,
            "forward/to_host_stack",
        ),
    ];
    run_cases(cases.into_iter().filter(|c| only.is_none_or(|o| c.name == o)).collect(), only, count, rounds)
}

/// ns/packet of the NetworkPolicy paths (the `policy` suite), next to
/// local delivery without policy, measured the same way.
pub(crate) fn policy_paths(count: u32, rounds: usize) -> anyhow::Result<Vec<ProgramPath>> {
    let tcp_ack = {
        let ip = Ipv4::tcp(POD_A, 40000, POD_B, 80, datapath_tests::packets::TCP_ACK, b"");
        ethernet(HOST_MAC_A, MAC_A, ETH_P_IP, &ip.bytes())
    };
    let local = |name, setup| Case {
        name,
        mode: RoutingMode::Native,
        program: program_names::FROM_POD,
        packet: frame(POD_B),
        per_run: 250,
        counts_as: "forward/local_delivery",
        setup,
    };
    let judged = |name, filler| Case {
        name,
        mode: RoutingMode::Native,
        program: program_names::FROM_POD,
        packet: tcp_ack.clone(),
        per_run: 250,
        counts_as: "drop/policy_denied_egress",
        setup: Setup::PolicyDenied { filler },
    };
    let cases = vec![
        local("local delivery, no policy", Setup::None),
        local("local delivery, policy, tracked", Setup::PolicyAllowed { filler: 10 }),
        local("local delivery, policy, tracked, 10k rules", Setup::PolicyAllowed { filler: 10_000 }),
        judged("new connection judged, 10 rules", 10),
        judged("new connection judged, 1k rules", 1_000),
        judged("new connection judged, 10k rules", 10_000),
    ];
    run_cases(cases, None, count, rounds)
}

fn run_cases(
    cases: Vec<Case>,
    only: Option<&str>,
    count: u32,
    rounds: usize,
) -> anyhow::Result<Vec<ProgramPath>> {
    if cases.is_empty() {
        anyhow::bail!("no program path is called {only:?}");
    }
    // Packets arrive on a real device (its MAC makes them PACKET_HOST, its
    // namespace holds the routes the reverse-path check consults); test
    // runs see the calling thread's namespace, so all of it runs in there.
    let device = RunDevice::new(HOST_MAC_A, &["10.244.2.0/24 via 192.0.2.2"]);
    let ctx = skb_context(device.ifindex);
    let netns_path = std::path::PathBuf::from(format!("/run/netns/{}", device.netns_name()));
    let (raw, net, harness) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                datapath_api::netns::enter(&netns_path)?;
                measure(&cases, &device, &ctx, count, rounds)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the measuring thread panicked"))?
    })?;
    let paths = cases
        .iter()
        .zip(raw.into_iter().zip(net).zip(harness))
        .map(|(c, ((raw, net), harness))| ProgramPath {
            name: c.name,
            raw: stats(raw),
            net: stats(net),
            harness: stats(harness),
            per_run: c.per_run,
        })
        .collect();
    Ok(paths)
}

type Samples = Vec<Vec<f64>>;

/// The rounds of [`program_paths`], on the calling thread (in the run
/// device's namespace): raw, net and harness ns/packet per case and round.
fn measure(
    cases: &[Case],
    device: &RunDevice,
    ctx: &[u8],
    count: u32,
    rounds: usize,
) -> anyhow::Result<(Samples, Samples, Samples)> {
    let _pinned = PinnedCpu::last()?;
    let empty = EmptyProgram::load()?;
    let datapaths = cases
        .iter()
        .map(|c| {
            let mut dp = datapath(c.mode, device)?;
            policy_setup(&mut dp, c.setup)?;
            Ok(dp)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut harness = vec![Vec::new(); cases.len()];
    let mut raw = vec![Vec::new(); cases.len()];
    let mut net = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, (c, dp)) in cases.iter().zip(&datapaths).enumerate() {
            let runs = (count / c.per_run).max(1);
            let before = counted(dp, c.counts_as)?;
            let mut data_out = vec![0u8; c.packet.len() + 256];
            let (mut ours, mut base) = (0.0, 0.0);
            for _ in 0..runs {
                let result = dp.program(c.program)?.test_run(TestRunOptions {
                    data_in: Some(&c.packet),
                    data_out: Some(&mut data_out),
                    ctx_in: Some(ctx),
                    repeat: c.per_run,
                    ..Default::default()
                })?;
                // The kernel reports the mean over the run's repeats.
                ours += result.duration.as_nanos() as f64;
                base += empty.ns_per_packet(&c.packet, ctx, c.per_run)?;
            }
            let took = counted(dp, c.counts_as)? - before;
            let sent = u64::from(runs) * u64::from(c.per_run);
            if took != sent {
                anyhow::bail!(
                    "{}: {took} of {sent} packets counted as {}; the bench measured another path",
                    c.name,
                    c.counts_as
                );
            }
            let (ours, base) = (ours / f64::from(runs), base / f64::from(runs));
            harness[i].push(base);
            raw[i].push(ours);
            net[i].push((ours - base).max(0.0));
        }
    }
    Ok((raw, net, harness))
}

/// `count` ClusterIP Services in 10.96.0.0/16, port 80, each with pod B
/// as its one backend, and the programs' Service lookups switched on.
fn services_setup(dp: &mut Datapath, count: u32) -> anyhow::Result<()> {
    use datapath_common::{Backend, BackendKey, IPPROTO_TCP, SERVICE_SCOPE_CLUSTER, Service, ServiceKey};
    for id in 1..=count {
        let [_, _, hi, lo] = id.to_be_bytes();
        let key = ServiceKey {
            vip: [10, 96, hi, lo],
            port: 80u16.to_be_bytes(),
            protocol: IPPROTO_TCP,
            scope: SERVICE_SCOPE_CLUSTER,
        };
        dp.put_backend(
            &BackendKey { service_id: id, slot: 0 },
            &Backend { ipv4: POD_B, port: 8080u16.to_be_bytes(), _pad: [0; 2] },
        )?;
        dp.put_service(&key, &Service { id, backend_count: 1, flags: 0, affinity_timeout_seconds: 0 })?;
    }
    anyhow::ensure!(dp.update_services_flag()?, "the Service lookups did not switch on");
    Ok(())
}

fn policy_setup(dp: &mut Datapath, setup: Setup) -> anyhow::Result<()> {
    use datapath_agent::bpf::policy::{PolicyMaps, PolicyRule};
    use datapath_common::{
        IPPROTO_UDP, POLICY_EGRESS, POLICY_INGRESS, POLICY_PREFIX_ANY_PROTOCOL, POLICY_PREFIX_FULL,
        PolicyRuleKey,
    };
    let (filler, allowed) = match setup {
        Setup::None => return Ok(()),
        Setup::Services { count } => return services_setup(dp, count),
        Setup::PolicyAllowed { filler } => (filler, true),
        Setup::PolicyDenied { filler } => (filler, false),
    };
    let (id_a, id_b) = (11u32, 12u32);
    let mut maps = PolicyMaps::default();
    maps.endpoints.insert(Ipv4Addr::from(POD_A), POLICY_INGRESS | POLICY_EGRESS);
    maps.endpoints.insert(Ipv4Addr::from(POD_B), POLICY_INGRESS);
    maps.peers.insert(Ipv4Addr::from(POD_A).into(), id_a);
    maps.peers.insert(Ipv4Addr::from(POD_B).into(), id_b);
    let rule = |endpoint, identity: u32, direction: u32, protocol, port: u16, prefix_len| PolicyRule {
        prefix_len,
        key: PolicyRuleKey {
            endpoint,
            identity: identity.to_be_bytes(),
            direction: direction as u8,
            protocol,
            port: port.to_be_bytes(),
        },
    };
    maps.rules.insert(rule(POD_B, id_a, POLICY_INGRESS, 0, 0, POLICY_PREFIX_ANY_PROTOCOL));
    maps.rules.insert(if allowed {
        rule(POD_A, id_b, POLICY_EGRESS, 0, 0, POLICY_PREFIX_ANY_PROTOCOL)
    } else {
        rule(POD_A, id_b, POLICY_EGRESS, IPPROTO_UDP, 53, POLICY_PREFIX_FULL)
    });
    maps.rules.extend(crate::bench_policy::filler_rules(POD_A, filler));
    dp.write_policy_maps(&PolicyMaps::default(), &maps)?;
    Ok(())
}

/// The datapath's own count of `forward/<path>` or `drop/<reason>`.
fn counted(dp: &Datapath, counter: &str) -> anyhow::Result<u64> {
    let counters = dp.counters()?;
    let (map, name) = match counter.split_once('/') {
        Some(("forward", name)) => (&counters.forwards, name),
        Some(("drop", name)) => (&counters.drops, name),
        _ => anyhow::bail!("bad counter name {counter}"),
    };
    map.get(name).copied().with_context(|| format!("no counter {counter}"))
}

/// The calling thread on the machine's last CPU until dropped: test runs
/// execute on the caller's CPU, so every figure comes from the same one.
struct PinnedCpu(nix::sched::CpuSet);

impl PinnedCpu {
    fn last() -> anyhow::Result<Self> {
        use nix::{sched, unistd::Pid};
        let before = sched::sched_getaffinity(Pid::from_raw(0))?;
        let cpus = std::thread::available_parallelism()?.get();
        let mut only = sched::CpuSet::new();
        only.set(cpus - 1)?;
        sched::sched_setaffinity(Pid::from_raw(0), &only)?;
        Ok(PinnedCpu(before))
    }
}

impl Drop for PinnedCpu {
    fn drop(&mut self) {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &self.0);
    }
}

/// `r0 = TC_ACT_OK; exit`: what BPF_PROG_TEST_RUN costs by itself (skb set-up,
/// the call, the clock), loaded from two raw instructions because it must not
/// live in the datapath's object.
struct EmptyProgram(std::os::fd::OwnedFd);

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
}

impl EmptyProgram {
    fn load() -> anyhow::Result<Self> {
        use std::os::fd::FromRawFd as _;
        const BPF_PROG_LOAD: libc::c_long = 5;
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        // mov64 r0, 0 ; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: attr points at live, correctly laid-out memory for the call.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, &attr as *const _, size_of::<ProgLoadAttr>())
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("loading the empty program");
        }
        // SAFETY: a new descriptor we own.
        Ok(EmptyProgram(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn ns_per_packet(&self, packet: &[u8], ctx: &[u8], count: u32) -> anyhow::Result<f64> {
        use std::os::fd::AsRawFd as _;
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: count,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: as above; the kernel writes only within data_out's size.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &mut attr as *mut _, size_of::<TestRunAttr>())
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("test-running the empty program");
        }
        Ok(attr.duration as f64)
    }
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:")).map(str::to_owned))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) struct ControlPlane {
    pub pods: usize,
    pub add_to_ping_p50: Duration,
    pub add_to_ping_p99: Duration,
    pub agent_rss_idle_kib: u64,
    pub endpoints: usize,
    pub remote_cidrs: usize,
    pub program_time: Duration,
    pub rss_at_scale_kib: u64,
}

/// CNI ADD to a pod that answers ping over `pods` pods (real agent and
/// plugin), then `endpoints` endpoints and `cidrs` remote pod CIDRs written
/// into the maps with the agent's own code, timed, with the RSS it takes.
pub(crate) fn control_plane(pods: usize, endpoints: usize, cidrs: usize) -> anyhow::Result<ControlPlane> {
    let mut node = Node::new("10.244.0.0/20", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    std::thread::sleep(Duration::from_millis(500));
    let agent_rss_idle_kib = node.agent_pid().map(rss_kib).unwrap_or(0);
    let conf = node.cni_config().to_string();
    let mut times = Vec::new();
    let mut namespaces = Vec::new();
    for i in 0..pods {
        let ns = Netns::new(format!("{}-p{i}", node.id));
        let netns = ns.path().display().to_string();
        let started = Instant::now();
        let add = node.cni(&Node::cni_env("ADD", &format!("bench-{i}"), &netns), conf.as_bytes());
        anyhow::ensure!(add.success, "ADD: {}", add.raw_stdout);
        let ip =
            add.stdout["ips"][0]["address"].as_str().unwrap_or_default().trim_end_matches("/32").to_owned();
        while !node.netns.exec_ok(&["ping", "-c", "1", "-W", "1", "-i", "0.01", &ip]) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "pod {i} never answered");
        }
        times.push(started.elapsed());
        namespaces.push(ns);
    }
    times.sort();
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    drop(namespaces);
    drop(node);

    // Scale: the same Datapath code the agent runs, in this process.
    let before = rss_kib(std::process::id());
    let started = Instant::now();
    let mut dp = Datapath::load_unpinned()?;
    for i in 0..endpoints {
        let ip = Ipv4Addr::from(0x0a80_0000u32 + i as u32); // 10.128.0.0/10: not overlapping the CIDRs below
        dp.insert_endpoint(
            ip,
            Endpoint {
                host_ifindex: 1000 + i as u32,
                pod_mac: [2, 0, 0, 0, 0, 1],
                host_mac: [2, 0, 0, 0, 0, 2],
                flags: 0,
                traffic_slot: datapath_common::NO_TRAFFIC_SLOT,
            },
        )?;
    }
    // 100k /24s over 5,000 nodes (Kubernetes' node limit), 20 CIDRs each.
    let routes: Vec<RemoteRoute> = (0..cidrs)
        .map(|i| RemoteRoute {
            pod_cidr: ipnet::Ipv4Net::new(Ipv4Addr::from(0x0b00_0000u32 + ((i as u32) << 8)), 24).unwrap(),
            node_ip: Ipv4Addr::from(0xc0a8_0000u32 + (i as u32 % 5000) + 1),
        })
        .collect();
    dp.sync_remote_nodes(&routes)?;
    let program_time = started.elapsed();
    let rss_at_scale_kib = rss_kib(std::process::id()).saturating_sub(before);
    Ok(ControlPlane {
        pods,
        add_to_ping_p50: pct(50),
        add_to_ping_p99: pct(99),
        agent_rss_idle_kib,
        endpoints,
        remote_cidrs: cidrs,
        program_time,
        rss_at_scale_kib,
    })
}

/// A figure and its target: `value` must be >= (or <=) `target`.
pub(crate) struct Target {
    pub what: String,
    pub value: f64,
    pub at_least: bool,
    pub target: f64,
}

impl Target {
    pub(crate) fn met(&self) -> bool {
        if self.at_least { self.value >= self.target } else { self.value <= self.target }
    }
    pub(crate) fn line(&self) -> String {
        format!(
            "{:<58} {:>10.2} {} {:<8} {}",
            self.what,
            self.value,
            if self.at_least { ">=" } else { "<=" },
            self.target,
            if self.met() { "met" } else { "SHORT" }
        )
    }
}
