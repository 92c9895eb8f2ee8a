//! Packet-level tests: the real programs, loaded into the kernel, run on
//! crafted frames with BPF_PROG_TEST_RUN. Checks verdicts, output bytes and
//! that exactly the expected counter moved.
//!
//! Each run's packet arrives on a [`RunDevice`]: a veth in a namespace of
//! the test's own, with the host veth's MAC (so a frame to it is
//! PACKET_HOST and one to any other MAC is not, as on the wire), the node's
//! address 192.0.2.1/24 and a route to the peer's pod CIDR, which the
//! reverse-path check consults. The sending pod is registered on it, and it
//! doubles as the uplink for "from uplink" runs.

use std::net::Ipv4Addr;

use aya::{
    maps::{HashMap, PerCpuArray, PerCpuValues},
    programs::{TestRun as _, TestRunOptions},
};
use datapath_agent::{bpf::Datapath, model::RemoteRoute};
use datapath_common::{
    DropReason, Endpoint, ForwardPath, ICMP_ERRORS_PER_SECOND, ModeMismatch, NodeConfig, NodeKey,
    PodInterface, RPF_CACHE_SLOTS, RPF_CACHE_USES, RateBudget, RoutingMode, RpfCacheEntry, map_names,
    program_names,
};
use datapath_tests::{packets::*, require_root};

const POD_A_IP: [u8; 4] = [10, 244, 1, 10];
const POD_A_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0a];
const HOST_A_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x0a];
const POD_B_IP: [u8; 4] = [10, 244, 1, 11];
const POD_B_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0b];
const HOST_B_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x0b];
const HOST_B_IFINDEX: u32 = 4242;
const GATEWAY: [u8; 4] = [169, 254, 1, 1];
const NODE_IP: [u8; 4] = RUN_DEVICE_IP;
const PEER_IP: [u8; 4] = [192, 0, 2, 2];
/// The peer node's MAC, as its frames carry it on the uplink.
const PEER_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 2];
const POD_A_SLOT: u32 = 0;
const POD_B_SLOT: u32 = 1;
const REMOTE_POD_IP: [u8; 4] = [10, 244, 2, 7];
const OUTSIDE_IP: [u8; 4] = [198, 51, 100, 9];
const VXLAN_PORT: u16 = 8472;

struct Harness {
    datapath: Datapath,
    device: RunDevice,
}

impl Harness {
    /// Pod A sending on the run device, pod B local; no cross-node mode.
    fn new() -> Self {
        let mut h = Self::empty();
        h.datapath
            .insert_pod_interface(
                h.device.ifindex,
                PodInterface {
                    pod_ipv4: POD_A_IP,
                    host_mac: HOST_A_MAC,
                    isolation: 0,
                    _pad: 0,
                    traffic_slot: POD_A_SLOT,
                },
            )
            .unwrap();
        h.datapath
            .insert_endpoint(
                Ipv4Addr::from(POD_B_IP),
                Endpoint {
                    host_ifindex: HOST_B_IFINDEX,
                    pod_mac: POD_B_MAC,
                    host_mac: HOST_B_MAC,
                    flags: 0,
                    traffic_slot: POD_B_SLOT,
                },
            )
            .unwrap();
        h
    }

    /// Nothing registered.
    fn empty() -> Self {
        let device = RunDevice::new(HOST_A_MAC, &["10.244.2.0/24 via 192.0.2.2"]);
        Self { datapath: Datapath::load_unpinned().expect("load the eBPF object (verifier)"), device }
    }

    fn run(&self, frame: &[u8]) -> Run {
        self.run_program(program_names::FROM_POD, frame)
    }

    /// Make this node part of a cluster: a peer owning 10.244.2.0/24 at
    /// 192.0.2.2; this node 192.0.2.1 with 10.244.1.0/24, its uplink the
    /// run device.
    fn with_peer(mut self, mode: RoutingMode) -> Self {
        self.datapath
            .set_node_config(NodeConfig {
                node_ipv4: NODE_IP,
                mode: mode as u32,
                uplink_ifindex: self.device.ifindex,
                vxlan_ifindex: self.device.ifindex,
                vni: 1,
                flags: 0,
                vxlan_port: VXLAN_PORT.to_be_bytes(),
                pod_cidr: [10, 244, 1, 0],
                pod_prefix_len: 24,
                _pad: 0,
                pod_mtu: 1500,
                conntrack_max_per_client: 0,
                host_netns_cookie: 0,
            })
            .unwrap();
        self.datapath
            .sync_remote_nodes(&[RemoteRoute {
                pod_cidr: "10.244.2.0/24".parse().unwrap(),
                node_ip: Ipv4Addr::from(PEER_IP),
            }])
            .unwrap();
        self
    }

    /// One test run of `from_pod` on the loopback, returning what the kernel said.
    fn try_run(&self, frame: &[u8]) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError> {
        let mut out = vec![0u8; frame.len() + 256];
        self.datapath.program_from_pod().unwrap().test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
    }

    fn run_program(&self, program: &'static str, frame: &[u8]) -> Run {
        test_run_on(&self.device, &self.datapath, program, frame)
    }

    fn run_from_uplink(&self, frame: &[u8]) -> Run {
        self.run_program(program_names::FROM_UPLINK, frame)
    }

    /// Every CPU has sent its ICMP errors for this second.
    fn exhaust_icmp_budget(&mut self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
        let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        let mut budget: PerCpuArray<_, RateBudget> =
            PerCpuArray::try_from(self.datapath.ebpf_mut().map_mut(map_names::ICMP_BUDGET).unwrap()).unwrap();
        let cpus = aya::util::nr_cpus().unwrap();
        let spent = RateBudget { window_start_ns: now_ns, used: ICMP_ERRORS_PER_SECOND, _pad: 0 };
        budget.set(0, PerCpuValues::try_from(vec![spent; cpus]).unwrap(), 0).unwrap();
    }

    fn device_netns(&self) -> String {
        self.device.netns_name().to_owned()
    }

    fn mode_mismatches(&mut self) -> Vec<(NodeKey, ModeMismatch)> {
        let map: HashMap<_, NodeKey, ModeMismatch> =
            HashMap::try_from(self.datapath.ebpf_mut().map_mut(map_names::PEER_MODE_MISMATCHES).unwrap())
                .unwrap();
        map.iter().map(Result::unwrap).collect()
    }
}

fn ip_frame(ip: &Ipv4) -> Vec<u8> {
    ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &ip.bytes())
}

/// Both builds of the programs pass the verifier: the debug build's log
/// call adds its stack frame to the programs' own, and the two together
/// must stay within the verifier's 512 bytes. Only this and the restart
/// test load the debug build; this one fails in a second.
#[test]
fn both_builds_pass_the_verifier() {
    use datapath_agent::bpf::{LoadOptions, ProgramBuild};
    require_root!();
    for build in [ProgramBuild::Normal, ProgramBuild::Debug] {
        let mut datapath = match Datapath::load_unpinned_build(LoadOptions::default(), build) {
            Ok(datapath) => datapath,
            Err(e) => panic!("the {build:?} build: {:?}", anyhow::Error::from(e)),
        };
        // How close each program is to the verifier's limit of 1,000,000
        // instructions walked (--nocapture shows it).
        let mut programs: Vec<_> = datapath
            .ebpf_mut()
            .programs()
            .map(|(name, program)| (name.to_owned(), program.info().unwrap().verified_instruction_count()))
            .collect();
        programs.sort();
        for (name, walked) in programs {
            eprintln!("{build:?} {name}: {walked:?} instructions walked by the verifier");
        }
    }
}

#[test]
fn arp_request_for_gateway_gets_reply_with_host_mac() {
    require_root!();
    let h = Harness::new();
    let run = h.run(&arp_request(POD_A_MAC, POD_A_IP, GATEWAY));
    run.assert_only_forward(ForwardPath::ArpReply, TC_ACT_REDIRECT);
    let mut expected = Vec::new();
    expected.extend_from_slice(&POD_A_MAC); // eth dst: the asking pod
    expected.extend_from_slice(&HOST_A_MAC); // eth src: host veth
    expected.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    expected.extend_from_slice(&HOST_A_MAC); // sender: host veth MAC
    expected.extend_from_slice(&GATEWAY); //       ... claims the gateway IP
    expected.extend_from_slice(&POD_A_MAC); // target: the pod
    expected.extend_from_slice(&POD_A_IP);
    assert_eq!(run.out, expected);
}

#[test]
fn arp_for_any_other_address_is_answered_too() {
    require_root!();
    let h = Harness::new();
    let run = h.run(&arp_request(POD_A_MAC, POD_A_IP, POD_B_IP));
    run.assert_only_forward(ForwardPath::ArpReply, TC_ACT_REDIRECT);
    assert_eq!(&run.out[28..32], &POD_B_IP, "reply claims the asked address");
}

#[test]
fn arp_for_the_pods_own_ip_goes_to_host_stack() {
    require_root!();
    let h = Harness::new();
    let frame = arp_request(POD_A_MAC, POD_A_IP, POD_A_IP);
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
    assert_eq!(run.out, frame, "passed frames are not modified");
}

#[test]
fn arp_claiming_another_address_is_dropped() {
    require_root!();
    let h = Harness::new();
    h.run(&arp_request(POD_A_MAC, POD_B_IP, GATEWAY)).assert_only_drop(DropReason::SpoofedArp);
}

#[test]
fn truncated_or_non_ipv4_arp_is_dropped() {
    require_root!();
    let h = Harness::new();
    let mut frame = arp_request(POD_A_MAC, POD_A_IP, GATEWAY);
    frame.truncate(14 + 20);
    h.run(&frame).assert_only_drop(DropReason::MalformedArp);
    let h = Harness::new();
    let mut frame = arp_request(POD_A_MAC, POD_A_IP, GATEWAY);
    frame[14 + 5] = 16; // plen 16: not IPv4 ARP
    h.run(&frame).assert_only_drop(DropReason::MalformedArp);
}

#[test]
fn ipv4_to_local_pod_is_redirected_with_rewritten_macs_and_ttl() {
    require_root!();
    let h = Harness::new();
    let ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
    let frame = ip_frame(&ip);
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    assert_eq!(&run.out[0..6], &POD_B_MAC, "dst MAC = destination pod");
    assert_eq!(&run.out[6..12], &HOST_B_MAC, "src MAC = destination's host veth");
    let hdr = &run.out[14..34];
    assert_eq!(hdr[8], 63, "TTL decremented");
    assert_eq!(checksum(hdr), 0, "IPv4 header checksum still valid");
    // Nothing else changed.
    assert_eq!(&run.out[12..22], &frame[12..22]);
    assert_eq!(hdr[9..10], frame[23..24]);
    assert_eq!(&run.out[26..], &frame[26..]);
}

#[test]
fn traffic_is_counted_per_endpoint_and_drops_per_direction() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Vxlan);
    let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, POD_B_IP));
    for _ in 0..3 {
        assert_eq!(h.run(&frame).verdict, TC_ACT_REDIRECT);
    }
    // A spoofed packet is still "sent" by the pod, then dropped.
    h.run(&ip_frame(&Ipv4::icmp_echo([10, 244, 1, 99], POD_B_IP)));
    let len = frame.len() as u64;
    let a = h.datapath.endpoint_traffic(POD_A_SLOT).unwrap();
    assert_eq!((a.sent_packets, a.sent_bytes, a.delivered_packets), (4, 4 * len, 0), "{a:?}");
    let b = h.datapath.endpoint_traffic(POD_B_SLOT).unwrap();
    assert_eq!((b.sent_packets, b.delivered_packets, b.delivered_bytes), (0, 3, 3 * len), "{b:?}");

    // The same reason from another program is kept apart.
    let run = h.run_program(program_names::FROM_OVERLAY, &frame);
    let drops = &run.counters.drops_by_direction;
    assert_eq!(drops["from_pod"]["spoofed_source"], 1);
    assert_eq!(drops["from_overlay"]["no_tunnel_key"], 1);
    assert_eq!(drops["from_pod"]["no_tunnel_key"], 0);
    assert_eq!(run.counters.forwards_by_direction["from_pod"]["local_delivery"], 3);
    // Every drop was offered to the monitor (nobody reads this private ring).
    assert_eq!(run.counters.monitor_events["emitted"], 2, "{:?}", run.counters.monitor_events);
}

#[test]
fn checksum_stays_valid_across_ttls() {
    require_root!();
    let h = Harness::new();
    for ttl in [2u8, 3, 64, 128, 255] {
        let mut ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
        ip.ttl = ttl;
        let run = h.run(&ip_frame(&ip));
        assert_eq!(run.verdict, TC_ACT_REDIRECT);
        assert_eq!(run.out[14 + 8], ttl - 1);
        assert_eq!(checksum(&run.out[14..34]), 0, "ttl {ttl}");
    }
}

#[test]
fn spoofed_source_is_dropped() {
    require_root!();
    let h = Harness::new();
    let ip = Ipv4::icmp_echo([10, 244, 1, 99], POD_B_IP);
    h.run(&ip_frame(&ip)).assert_only_drop(DropReason::SpoofedSource);
}

#[test]
fn spoofed_source_to_host_is_dropped_too() {
    require_root!();
    let h = Harness::new();
    let ip = Ipv4::icmp_echo([192, 0, 2, 1], [10, 0, 0, 1]);
    h.run(&ip_frame(&ip)).assert_only_drop(DropReason::SpoofedSource);
}

/// The ICMP time exceeded a router sends for `sent` (an Ethernet frame
/// whose TTL ran out), from `router`, with the MACs swapped: built here
/// byte by byte from RFC 792, not by the code under test.
fn time_exceeded(sent: &[u8], router: [u8; 4]) -> Vec<u8> {
    let original_ip = &sent[14..];
    let mut icmp = vec![11, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&original_ip[..28]);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&router);
    ip.extend_from_slice(&original_ip[12..16]);
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ethernet(sent[6..12].try_into().unwrap(), sent[0..6].try_into().unwrap(), ETH_P_IP, &ip)
}

#[test]
fn ttl_one_is_answered_with_time_exceeded() {
    require_root!();
    for ttl in [0u8, 1] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let mut ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
        ip.ttl = ttl;
        let frame = ip_frame(&ip);
        let run = h.run(&frame);
        run.assert_answered(DropReason::TtlExceeded);
        assert_eq!(run.out, time_exceeded(&frame, NODE_IP), "ttl {ttl}: exact reply bytes");
        let reply = Parsed::new(&run.out);
        assert!(reply.ip_header_ok && checksum(&reply.l4) == 0, "checksums verify");
    }
}

#[test]
fn no_time_exceeded_about_an_icmp_error_or_a_later_fragment() {
    require_root!();
    // RFC 1122 3.2.2: never an ICMP error about an ICMP error, nor about a
    // fragment other than the first. Dropped and counted all the same.
    let mut error = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
    error.payload[0] = 3; // destination unreachable
    let mut later = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
    later.frag = 0x00b9;
    for mut ip in [error, later] {
        ip.ttl = 1;
        let h = Harness::new().with_peer(RoutingMode::Native);
        h.run(&ip_frame(&ip)).assert_only_drop(DropReason::TtlExceeded);
    }
}

#[test]
fn time_exceeded_is_rate_limited_per_cpu() {
    require_root!();
    let mut h = Harness::new().with_peer(RoutingMode::Native);
    h.exhaust_icmp_budget();
    let mut ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
    ip.ttl = 1;
    // Over the budget: counted, not answered.
    h.run(&ip_frame(&ip)).assert_only_drop(DropReason::TtlExceeded);
}

#[test]
fn ttl_one_to_the_host_stack_is_the_hosts_business() {
    require_root!();
    // Not forwarded by us (this node, the outside): the kernel delivers or
    // answers it itself.
    for dst in [NODE_IP, OUTSIDE_IP] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let mut ip = Ipv4::icmp_echo(POD_A_IP, dst);
        ip.ttl = 1;
        let frame = ip_frame(&ip);
        let run = h.run(&frame);
        run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
        assert_eq!(run.out, frame);
    }
}

#[test]
fn frames_not_addressed_to_the_node_are_not_forwarded() {
    require_root!();
    let ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP).bytes();
    let remote = Ipv4::icmp_echo(POD_A_IP, REMOTE_POD_IP).bytes();
    let other_host = [0x02, 0x42, 0, 0, 0, 1];
    let multicast = [0x01, 0x00, 0x5e, 0, 0, 1];
    for (what, dst, packet) in [
        ("another host's MAC, to a local pod", other_host, &ip),
        ("broadcast, to a local pod", [0xff; 6], &ip),
        ("multicast, to a local pod", multicast, &ip),
        ("broadcast, to a remote pod", [0xff; 6], &remote),
    ] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let run = h.run(&ethernet(dst, POD_A_MAC, ETH_P_IP, packet));
        assert_eq!(run.counters.drop_count(DropReason::WrongDestinationMac), 1, "{what}");
        run.assert_only_drop(DropReason::WrongDestinationMac);
    }
    // A broadcast the pod means for the node (DHCP-style) is the node's.
    let h = Harness::new().with_peer(RoutingMode::Native);
    let dhcp = Ipv4::udp(POD_A_IP, 68, [255; 4], 67, b"discover", true).bytes();
    h.run(&ethernet([0xff; 6], POD_A_MAC, ETH_P_IP, &dhcp))
        .assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
}

#[test]
fn bad_header_checksum_is_not_forwarded() {
    require_root!();
    for dst in [POD_B_IP, REMOTE_POD_IP] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let mut bytes = Ipv4::icmp_echo(POD_A_IP, dst).bytes();
        bytes[10] ^= 0x5a;
        h.run(&ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &bytes)).assert_only_drop(DropReason::BadIpChecksum);
    }
    // The node's own traffic: the kernel checks it (and drops it).
    let h = Harness::new().with_peer(RoutingMode::Native);
    let mut bytes = Ipv4::icmp_echo(POD_A_IP, NODE_IP).bytes();
    bytes[10] ^= 0x5a;
    h.run(&ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &bytes))
        .assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
}

#[test]
fn unknown_destination_goes_to_host_stack_unmodified() {
    require_root!();
    let h = Harness::new();
    let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, [10, 0, 0, 1]));
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
    assert_eq!(run.out, frame);
}

#[test]
fn ipv6_goes_to_host_stack() {
    require_root!();
    let h = Harness::new();
    let mut v6 = vec![0x60, 0, 0, 0, 0, 8, 58, 64];
    v6.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    v6.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    v6.extend_from_slice(&[133, 0, 0, 0, 0, 0, 0, 0]);
    let frame = ethernet([0x33, 0x33, 0, 0, 0, 2], POD_A_MAC, ETH_P_IPV6, &v6);
    h.run(&frame).assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
}

#[test]
fn vlan_tagged_frames_are_dropped() {
    require_root!();
    let h = Harness::new();
    let mut tagged = vec![0x00, 0x64, 0x08, 0x00]; // VID 100, inner IPv4
    tagged.extend_from_slice(&Ipv4::icmp_echo(POD_A_IP, POD_B_IP).bytes());
    let frame = ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_8021Q, &tagged);
    h.run(&frame).assert_only_drop(DropReason::VlanTagged);
}

#[test]
fn truncated_ethernet_is_refused_by_the_kernel_before_the_program() {
    require_root!();
    // A frame shorter than 14 bytes never reaches a TC program (the kernel
    // refuses it in test runs and never builds such an skb on a veth); the
    // program still guards with DropReason::TruncatedEthernet.
    let result = Harness::new().try_run(&[0u8; 10]);
    assert!(result.is_err(), "kernel accepted a 10-byte frame: {result:?}");
}

#[test]
fn ipv4_header_shorter_than_20_bytes_is_refused_by_the_kernel_test_run() {
    require_root!();
    // BPF_PROG_TEST_RUN insists on a full IPv4 header for IPv4 frames, so this
    // case is tested on a real veth (same_node.rs: raw frames from a pod).
    let bytes = Ipv4::icmp_echo(POD_A_IP, POD_B_IP).bytes();
    let result = Harness::new().try_run(&ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &bytes[..10]));
    assert!(result.is_err(), "kernel ran a truncated IPv4 header: {result:?}");
}

#[test]
fn ihl_beyond_the_frame_is_dropped() {
    require_root!();
    let h = Harness::new();
    let mut bytes = Ipv4::icmp_echo(POD_A_IP, POD_B_IP).bytes();
    bytes.truncate(20);
    bytes[0] = 0x4f; // IHL 15 = 60-byte header, frame has 20
    bytes[2..4].copy_from_slice(&20u16.to_be_bytes());
    h.run(&ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &bytes)).assert_only_drop(DropReason::MalformedIpv4);
}

#[test]
fn bad_ihl_version_or_length_is_dropped() {
    require_root!();
    let ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
    for (what, patch) in
        [("ihl 4", (0usize, 0x44u8)), ("version 6", (0, 0x65)), ("total length beyond frame", (2, 0x7f))]
    {
        let h = Harness::new();
        let mut bytes = ip.bytes();
        bytes[patch.0] = patch.1;
        let run = h.run(&ethernet(HOST_A_MAC, POD_A_MAC, ETH_P_IP, &bytes));
        assert_eq!(run.counters.drop_count(DropReason::MalformedIpv4), 1, "{what}");
        run.assert_only_drop(DropReason::MalformedIpv4);
    }
}

#[test]
fn ipv4_options_are_not_forwarded() {
    require_root!();
    // Router alert, record route, loose source route: the datapath forwards
    // none (the kernel refuses source routes, and would process the rest).
    for option in
        [vec![0x94, 0x04, 0x00, 0x00], vec![0x07, 0x07, 0x04, 0, 0, 0, 0, 0x00], vec![0x83, 0x03, 0x04, 0x00]]
    {
        let h = Harness::new();
        let mut ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
        ip.options = option;
        h.run(&ip_frame(&ip)).assert_only_drop(DropReason::IpOptions);
    }
    // For the node itself: the kernel's to judge, untouched.
    let h = Harness::new().with_peer(RoutingMode::Native);
    let mut ip = Ipv4::icmp_echo(POD_A_IP, NODE_IP);
    ip.options = vec![0x94, 0x04, 0x00, 0x00];
    let frame = ip_frame(&ip);
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
    assert_eq!(run.out, frame);
}

#[test]
fn fragments_are_forwarded_like_any_packet() {
    require_root!();
    // First fragment (MF) and a later one (offset 185 = 1480 bytes): the
    // datapath routes on addresses only, so both are delivered.
    for frag in [0x2000u16, 0x00b9] {
        let h = Harness::new();
        let mut ip = Ipv4::icmp_echo(POD_A_IP, POD_B_IP);
        ip.frag = frag;
        let run = h.run(&ip_frame(&ip));
        run.assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
        assert_eq!(checksum(&run.out[14..34]), 0);
    }
}

#[test]
fn unregistered_interface_is_dropped() {
    require_root!();
    let h = Harness::empty();
    h.run(&ip_frame(&Ipv4::icmp_echo(POD_A_IP, POD_B_IP))).assert_only_drop(DropReason::UnknownInterface);
}

/// TTL decremented by one, checksum valid, everything else as sent.
fn assert_routed(run: &Run, sent: &[u8]) {
    assert_eq!(run.out[14 + 8], sent[14 + 8] - 1, "TTL decremented");
    assert_eq!(checksum(&run.out[14..34]), 0, "IPv4 checksum valid");
    assert_eq!(&run.out[34..], &sent[34..], "payload untouched");
    assert_eq!(&run.out[26..34], &sent[26..34], "addresses untouched (no NAT)");
}

#[test]
fn remote_pod_native_goes_out_of_the_uplink() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Native);
    let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, REMOTE_POD_IP));
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::ToRemoteNative, TC_ACT_REDIRECT);
    assert_routed(&run, &frame);
}

#[test]
fn remote_pod_overlay_is_encapsulated() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Vxlan);
    let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, REMOTE_POD_IP));
    let run = h.run(&frame);
    run.assert_only_forward(ForwardPath::ToRemoteOverlay, TC_ACT_REDIRECT);
    assert_routed(&run, &frame);
}

#[test]
fn peer_node_address_is_reached_directly() {
    require_root!();
    for (mode, path) in [
        (RoutingMode::Native, ForwardPath::ToRemoteNative),
        (RoutingMode::Vxlan, ForwardPath::ToRemoteOverlay),
    ] {
        let h = Harness::new().with_peer(mode);
        h.run(&ip_frame(&Ipv4::icmp_echo(POD_A_IP, PEER_IP))).assert_only_forward(path, TC_ACT_REDIRECT);
    }
}

#[test]
fn outside_and_own_node_go_to_the_host_stack_unmodified() {
    require_root!();
    for dst in [OUTSIDE_IP, NODE_IP] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, dst));
        let run = h.run(&frame);
        run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
        assert_eq!(run.out, frame);
    }
}

#[test]
fn remote_pod_without_a_mode_goes_to_the_host_stack() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Unset);
    let frame = ip_frame(&Ipv4::icmp_echo(POD_A_IP, REMOTE_POD_IP));
    h.run(&frame).assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
}

#[test]
fn remote_pod_with_ttl_one_is_answered() {
    require_root!();
    for mode in [RoutingMode::Native, RoutingMode::Vxlan] {
        let h = Harness::new().with_peer(mode);
        let mut ip = Ipv4::icmp_echo(POD_A_IP, REMOTE_POD_IP);
        ip.ttl = 1;
        let frame = ip_frame(&ip);
        let run = h.run(&frame);
        run.assert_answered(DropReason::TtlExceeded);
        assert_eq!(run.out, time_exceeded(&frame, NODE_IP));
    }
}

#[test]
fn spoofed_source_to_a_remote_pod_is_dropped() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Native);
    h.run(&ip_frame(&Ipv4::icmp_echo([10, 244, 1, 99], REMOTE_POD_IP)))
        .assert_only_drop(DropReason::SpoofedSource);
}

/// A frame the peer node (PEER_MAC) puts on the uplink for this node.
fn from_peer(ip: &[u8]) -> Vec<u8> {
    ethernet(HOST_A_MAC, PEER_MAC, ETH_P_IP, ip)
}

#[test]
fn from_uplink_delivers_local_pods_and_passes_the_rest() {
    require_root!();
    // A remote pod's packet for our pod B (the route back is the uplink).
    let h = Harness::new().with_peer(RoutingMode::Native);
    let frame = from_peer(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP).bytes());
    let run = h.run_from_uplink(&frame);
    run.assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    assert_eq!(&run.out[0..6], &POD_B_MAC);
    assert_eq!(&run.out[6..12], &HOST_B_MAC);
    assert_routed(&run, &frame);

    // For the node itself, ARP, VLAN-tagged and unreadable IPv4: all the
    // node's business, untouched.
    let mut tagged = vec![0x00, 0x64, 0x08, 0x00];
    tagged.extend_from_slice(&Ipv4::icmp_echo(PEER_IP, POD_B_IP).bytes());
    let mut bad_ihl = Ipv4::icmp_echo(PEER_IP, NODE_IP).bytes();
    bad_ihl[0] = 0x44;
    for frame in [
        from_peer(&Ipv4::icmp_echo(PEER_IP, NODE_IP).bytes()),
        arp_request(PEER_MAC, PEER_IP, NODE_IP),
        ethernet(HOST_A_MAC, PEER_MAC, ETH_P_8021Q, &tagged),
        from_peer(&bad_ihl),
    ] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let run = h.run_from_uplink(&frame);
        run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
        assert_eq!(run.out, frame);
    }
}

#[test]
fn from_uplink_refuses_what_the_kernel_would_not_forward() {
    require_root!();
    let echo = |src: [u8; 4]| Ipv4::icmp_echo(src, POD_B_IP).bytes();
    let mut bad_checksum = echo(REMOTE_POD_IP);
    bad_checksum[10] ^= 0xff;
    let mut options = Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP);
    options.options = vec![0x83, 0x03, 0x04, 0x00];
    let cases: Vec<(&str, Vec<u8>, DropReason)> = vec![
        (
            "another host's MAC",
            ethernet([0x02, 0x42, 0, 0, 0, 1], PEER_MAC, ETH_P_IP, &echo(REMOTE_POD_IP)),
            DropReason::WrongDestinationMac,
        ),
        (
            "broadcast MAC",
            ethernet([0xff; 6], PEER_MAC, ETH_P_IP, &echo(REMOTE_POD_IP)),
            DropReason::WrongDestinationMac,
        ),
        (
            "multicast MAC",
            ethernet([0x01, 0, 0x5e, 0, 0, 1], PEER_MAC, ETH_P_IP, &echo(REMOTE_POD_IP)),
            DropReason::WrongDestinationMac,
        ),
        ("loopback source", from_peer(&echo([127, 0, 0, 1])), DropReason::MartianSource),
        ("zero-network source", from_peer(&echo([0, 0, 0, 7])), DropReason::MartianSource),
        ("multicast source", from_peer(&echo([224, 0, 0, 5])), DropReason::MartianSource),
        ("broadcast source", from_peer(&echo([255; 4])), DropReason::MartianSource),
        ("the destination itself (land)", from_peer(&echo(POD_B_IP)), DropReason::ReversePath),
        ("a neighbour pod (reflection)", from_peer(&echo(POD_A_IP)), DropReason::ReversePath),
        ("an unused address of our pod CIDR", from_peer(&echo([10, 244, 1, 200])), DropReason::ReversePath),
        ("this node's own address", from_peer(&echo(NODE_IP)), DropReason::ReversePath),
        ("a source with no route back", from_peer(&echo(OUTSIDE_IP)), DropReason::ReversePath),
        ("bad header checksum", from_peer(&bad_checksum), DropReason::BadIpChecksum),
        ("source-route option", from_peer(&options.bytes()), DropReason::IpOptions),
    ];
    for (what, frame, reason) in cases {
        let h = Harness::new().with_peer(RoutingMode::Native);
        let run = h.run_from_uplink(&frame);
        assert_eq!(run.counters.drop_count(reason), 1, "{what}: counted as {}", reason.name());
        run.assert_only_drop(reason);
    }
}

#[test]
fn from_uplink_reverse_path_follows_the_nodes_routes() {
    require_root!();
    // A source routed back through the uplink passes: the link's own
    // subnet and a prefix the node routes that way.
    let h = Harness::new().with_peer(RoutingMode::Native);
    h.run_from_uplink(&from_peer(&Ipv4::icmp_echo([192, 0, 2, 77], POD_B_IP).bytes()))
        .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    // Routed through another interface (the veth's far end): strict
    // reverse path refuses it, as rp_filter=1 does.
    let h = Harness::new().with_peer(RoutingMode::Native);
    let mut route = vec!["ip", "-n"];
    let ns = h.device_netns();
    route.extend([ns.as_str(), "route", "add", "203.0.113.0/24", "dev", "dptrun1"]);
    datapath_tests::sh(&route);
    h.run_from_uplink(&from_peer(&Ipv4::icmp_echo([203, 0, 113, 5], POD_B_IP).bytes()))
        .assert_only_drop(DropReason::ReversePath);
    // Forwarding off on the uplink: the kernel would not forward at all.
    let h = Harness::new().with_peer(RoutingMode::Native);
    let ns = h.device_netns();
    datapath_tests::sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.conf.dptrun0.forwarding=0"]);
    h.run_from_uplink(&from_peer(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP).bytes()))
        .assert_only_drop(DropReason::ForwardingDisabled);
}

#[test]
fn a_confirmed_reverse_path_is_remembered_for_a_bounded_number_of_packets() {
    require_root!();
    let mut h = Harness::new().with_peer(RoutingMode::Native);
    let frame = from_peer(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP).bytes());
    h.run_from_uplink(&frame).assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    // The route back goes away: the cached confirmation still serves...
    let ns = h.device_netns();
    datapath_tests::sh(&["ip", "-n", &ns, "route", "del", "10.244.2.0/24"]);
    let run = h.run_from_uplink(&frame);
    assert_eq!(run.counters.forward_count(ForwardPath::LocalDelivery), 2, "served from the cache");
    // ...until it has served its packets: then the FIB is asked again.
    {
        let mut cache: PerCpuArray<_, RpfCacheEntry> =
            PerCpuArray::try_from(h.datapath.ebpf_mut().map_mut(map_names::RPF_CACHE).unwrap()).unwrap();
        for slot in 0..RPF_CACHE_SLOTS {
            let entries = cache.get(&slot, 0).unwrap();
            if entries.iter().any(|e| e.saddr == REMOTE_POD_IP) {
                let used: Vec<RpfCacheEntry> = entries
                    .iter()
                    .map(|e| {
                        if e.saddr == REMOTE_POD_IP {
                            RpfCacheEntry { uses: RPF_CACHE_USES, ..*e }
                        } else {
                            *e
                        }
                    })
                    .collect();
                cache.set(slot, PerCpuValues::try_from(used).unwrap(), 0).unwrap();
            }
        }
    }
    let run = h.run_from_uplink(&frame);
    assert_eq!(run.verdict, TC_ACT_SHOT);
    assert_eq!(run.counters.drop_count(DropReason::ReversePath), 1, "the FIB says no now");
}

/// A pod B whose host veth is the run device's peer (`dptrun1`), with MTU
/// `mtu`, and the node's pod MTU set to it: bpf_check_mtu asks a real device.
fn with_pod_b_behind_a_real_veth(mut h: Harness, mtu: u32) -> Harness {
    let ns = h.device_netns();
    datapath_tests::sh(&["ip", "-n", &ns, "link", "set", "dptrun1", "mtu", &mtu.to_string()]);
    let link: serde_json::Value =
        serde_json::from_str(&datapath_tests::sh(&["ip", "-n", &ns, "-j", "link", "show", "dptrun1"]))
            .unwrap();
    let ifindex = link[0]["ifindex"].as_u64().unwrap() as u32;
    let endpoint = Endpoint {
        host_ifindex: ifindex,
        pod_mac: POD_B_MAC,
        host_mac: HOST_B_MAC,
        flags: 0,
        traffic_slot: POD_B_SLOT,
    };
    h.datapath.insert_endpoint(Ipv4Addr::from(POD_B_IP), endpoint).unwrap();
    let config = h.datapath.node_config().unwrap();
    h.datapath.set_node_config(NodeConfig { pod_mtu: mtu, ..config }).unwrap();
    h
}

/// An echo of `total` bytes (IPv4 total length) from a remote pod to pod B.
fn sized_echo(total: usize, df: bool) -> Ipv4 {
    let mut ip = Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP);
    ip.payload.resize(total - 20, 0x5a);
    let c = checksum(&{
        let mut icmp = ip.payload.clone();
        icmp[2..4].copy_from_slice(&[0, 0]);
        icmp
    });
    ip.payload[2..4].copy_from_slice(&c.to_be_bytes());
    ip.frag = if df { 0x4000 } else { 0 };
    ip
}

#[test]
fn packets_larger_than_the_pods_mtu_get_fragmentation_needed_or_the_kernel() {
    require_root!();
    // At the MTU: delivered.
    let h = with_pod_b_behind_a_real_veth(Harness::new().with_peer(RoutingMode::Native), 1400);
    h.run_from_uplink(&from_peer(&sized_echo(1400, true).bytes()))
        .assert_only_forward(ForwardPath::LocalDelivery, TC_ACT_REDIRECT);
    // Above it with DF: ICMP fragmentation needed with the pod's MTU, from
    // the node, back to the sender (RFC 1191), exact bytes.
    let h = with_pod_b_behind_a_real_veth(Harness::new().with_peer(RoutingMode::Native), 1400);
    let frame = from_peer(&sized_echo(1401, true).bytes());
    let run = h.run_from_uplink(&frame);
    run.assert_answered(DropReason::PacketTooBig);
    let mut expected = time_exceeded(&frame, NODE_IP);
    let icmp = 14 + 20;
    expected[icmp..icmp + 2].copy_from_slice(&[3, 4]);
    expected[icmp + 6..icmp + 8].copy_from_slice(&1400u16.to_be_bytes());
    expected[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
    let c = checksum(&expected[icmp..]);
    expected[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run.out, expected);
    // Without DF: the kernel's to fragment, untouched.
    let h = with_pod_b_behind_a_real_veth(Harness::new().with_peer(RoutingMode::Native), 1400);
    let frame = from_peer(&sized_echo(1401, false).bytes());
    let run = h.run_from_uplink(&frame);
    run.assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
    assert_eq!(run.out, frame);
}

#[test]
fn nothing_is_delivered_to_a_pod_whose_host_veth_is_down() {
    require_root!();
    let mut h = Harness::new().with_peer(RoutingMode::Native);
    h.datapath.set_host_veth_down(HOST_B_IFINDEX, true).unwrap();
    h.run(&ip_frame(&Ipv4::icmp_echo(POD_A_IP, POD_B_IP))).assert_only_drop(DropReason::EndpointDown);
    let h2 = {
        let mut h2 = Harness::new().with_peer(RoutingMode::Native);
        h2.datapath.set_host_veth_down(HOST_B_IFINDEX, true).unwrap();
        h2
    };
    h2.run_from_uplink(&from_peer(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP).bytes()))
        .assert_only_drop(DropReason::EndpointDown);
    // Up again: delivered.
    assert_eq!(h.datapath.set_host_veth_down(HOST_B_IFINDEX, false).unwrap(), Some(Ipv4Addr::from(POD_B_IP)));
    let run = h.run(&ip_frame(&Ipv4::icmp_echo(POD_A_IP, POD_B_IP)));
    assert_eq!(run.verdict, TC_ACT_REDIRECT);
}

#[test]
fn from_uplink_ttl_one_is_answered_back_out_of_the_uplink() {
    require_root!();
    let h = Harness::new().with_peer(RoutingMode::Native);
    let mut ip = Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP);
    ip.ttl = 1;
    let frame = from_peer(&ip.bytes());
    let run = h.run_from_uplink(&frame);
    run.assert_answered(DropReason::TtlExceeded);
    assert_eq!(run.out, time_exceeded(&frame, NODE_IP), "to the peer's MAC, from the node's address");
}

#[test]
fn peers_in_the_other_mode_are_named() {
    require_root!();
    // A native node gets VXLAN from a known peer.
    let mut h = Harness::new().with_peer(RoutingMode::Native);
    let vxlan = Ipv4::udp(PEER_IP, 41000, NODE_IP, VXLAN_PORT, &[0x08, 0, 0, 0, 0, 0, 1, 0], false);
    h.run_from_uplink(&from_peer(&vxlan.bytes())).assert_only_drop(DropReason::PeerModeMismatch);
    let noted = h.mode_mismatches();
    assert_eq!(noted.len(), 1);
    assert_eq!((noted[0].0.ipv4, noted[0].1.packets), (PEER_IP, 1), "the peer is noted for the agent");
    // Not from a node, or another port: the node's own business.
    for ip in [
        Ipv4::udp([192, 0, 2, 77], 41000, NODE_IP, VXLAN_PORT, b"x", false),
        Ipv4::udp(PEER_IP, 41000, NODE_IP, 53, b"x", false),
    ] {
        let h = Harness::new().with_peer(RoutingMode::Native);
        h.run_from_uplink(&from_peer(&ip.bytes())).assert_only_forward(ForwardPath::ToHostStack, TC_ACT_OK);
    }
    // A VXLAN node gets a peer's pod traffic unencapsulated.
    let mut h = Harness::new().with_peer(RoutingMode::Vxlan);
    h.run_from_uplink(&from_peer(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP).bytes()))
        .assert_only_drop(DropReason::PeerModeMismatch);
    assert_eq!(h.mode_mismatches()[0].0.ipv4, PEER_IP, "noted as the CIDR's node");
}

#[test]
fn from_overlay_without_tunnel_metadata_is_dropped() {
    require_root!();
    // BPF_PROG_TEST_RUN cannot attach tunnel metadata, so this is the one
    // overlay-ingress verdict testable here; the others run in cross_node.rs.
    let h = Harness::new().with_peer(RoutingMode::Vxlan);
    let frame = ip_frame(&Ipv4::icmp_echo(REMOTE_POD_IP, POD_B_IP));
    h.run_program(program_names::FROM_OVERLAY, &frame).assert_only_drop(DropReason::NoTunnelKey);
}
