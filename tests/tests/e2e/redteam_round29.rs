//! Red team, round 29: the TCP sequence checks on Service connections and
//! the outside budget (`conntrack_max_outside`, now also holding UDP),
//! attacked from outside (a host on the nodes' segment). Each test prints
//! what it measured (`--nocapture`); assertions state what should hold.
//! R29-2 (a forged SYN reopened a half-closed connection), R29-1 (a UDP
//! burst locked outside TCP clients out) and R29-6 (forged SYNs locked a
//! chosen outside client out) are fixed and their tests run; the other
//! findings' tests are ignored as known gaps (docs/services.md). What held (bulk and wrapping transfers, TCP Fast
//! Open, config bounds, counter drift) is recorded in stop 29's note, not
//! kept here.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Netns, Node, UPLINK, in_netns, mac_of, send_raw_frames},
    packets::{ETH_P_IP, Ipv4, TCP_ACK, TCP_SYN, ethernet},
    require_root,
};

use super::{
    redteam_policy::outside_host,
    services::{Lab, lab, parse_answer, wait_served},
};

pub(super) const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
pub(super) const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
pub(super) const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 66);
pub(super) const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 29, 10);
pub(super) const TCP_NP: u16 = 30080;
const UDP_NP: u16 = 30053;
pub(super) const BULK_PORT: u16 = 9000;
pub(super) const BULK_NP: u16 = 30090;

// ---------------------------------------------------------------------------
// Lab
// ---------------------------------------------------------------------------

/// The services lab with both agents restarted on `settings` (plus
/// `serve_outside_clients = true`), then `services` added live.
pub(super) fn outside_lab(mode: &str, settings: &str, services: impl Fn(&Lab) -> String) -> Lab {
    let mut lab = lab(mode);
    let base = format!("serve_outside_clients = true\n{settings}");
    for node in [&mut lab.a, &mut lab.b] {
        node.set_extra_config(&base);
        node.stop_agent();
        node.start_agent();
    }
    let services = services(&lab);
    lab.set_services(&format!("{base}{services}"));
    lab
}

/// Service `name` at VIP: TCP 80 -> 8080 (node port TCP_NP), UDP 53 -> 5353
/// (node port UDP_NP), TCP 81 -> BULK_PORT (node port BULK_NP), with
/// `policy` ("Local" or "Cluster").
pub(super) fn np_service(backends: &[Ipv4Addr], policy: &str) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"rt29\"\ncluster_ip = \"{VIP}\"\nexternal_traffic_policy = \"{policy}\"\n\
         backends = [{}]\n[[services.ports]]\nport = 80\ntarget_port = 8080\nnode_port = {TCP_NP}\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = 5353\nnode_port = {UDP_NP}\n\
         [[services.ports]]\nport = 81\ntarget_port = {BULK_PORT}\nnode_port = {BULK_NP}\n",
        list.join(", ")
    )
}

/// One TCP request from `host` to `addr:port` (1.5 s to connect).
pub(super) fn ask(host: &Netns, addr: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
    in_netns(&host.path(), move || {
        let mut conn = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(1500))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        writeln!(conn, "who")?;
        let mut line = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other("closed"));
        }
        Ok(parse_answer(&line).0)
    })
    .join()
    .unwrap()
}

/// One UDP query from a fresh port (1.5 s for the answer).
pub(super) fn ask_udp(host: &Netns, addr: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
    in_netns(&host.path(), move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(1500)))?;
        s.send_to(b"who\n", (addr, port))?;
        let mut buf = [0u8; 256];
        let (n, _) = s.recv_from(&mut buf)?;
        Ok(parse_answer(&String::from_utf8_lossy(&buf[..n])).0)
    })
    .join()
    .unwrap()
}

/// How many of `tries` TCP connections from `ns` to `addr:port` open.
pub(super) fn connects(ns: &Netns, addr: Ipv4Addr, port: u16, tries: usize) -> usize {
    in_netns(&ns.path(), move || {
        (0..tries)
            .filter(|_| TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(1500)).is_ok())
            .count()
    })
    .join()
    .unwrap()
}

pub(super) fn rows(node: &Node) -> Vec<serde_json::Value> {
    node.inspect("conntrack").as_array().unwrap().clone()
}

pub(super) fn row_of(node: &Node, client: Ipv4Addr, client_port: u16) -> Option<serde_json::Value> {
    rows(node).into_iter().find(|c| c["client_ip"] == client.to_string() && c["client_port"] == client_port)
}

pub(super) fn state_of(node: &Node, client: Ipv4Addr, client_port: u16) -> Option<String> {
    row_of(node, client, client_port).map(|r| r["state"].as_str().unwrap().to_owned())
}

/// The count the programs keep for all outside clients (key 0.0.0.0 of
/// `conntrack_clients`), read with bpftool: the raw value bytes.
fn outside_count_raw(node: &Node) -> String {
    let dir = node.bpffs_dir.join("maps");
    let pin = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("conntrack_clients"));
    let Some(pin) = pin else { return "no conntrack_clients pin".into() };
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(&pin)
        .args(["key", "0", "0", "0", "0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    if v.is_null() { text } else { v["formatted"]["value"].to_string() + &v["value"].to_string() }
}

pub(super) fn frames_from(attacker: &Netns, node: &Node, packets: Vec<Ipv4>) -> Vec<Vec<u8>> {
    let (node_mac, my_mac) = (mac_of(&node.netns, UPLINK), mac_of(attacker, "eth0"));
    packets.into_iter().map(|p| ethernet(node_mac, my_mac, ETH_P_IP, &p.bytes())).collect()
}

/// The state of a connection over time after its end: (at +1 s, at +15 s).
pub(super) fn state_after_close(
    node: &Node,
    client: Ipv4Addr,
    port: u16,
) -> (Option<String>, Option<String>) {
    std::thread::sleep(Duration::from_secs(1));
    let first = state_of(node, client, port);
    std::thread::sleep(Duration::from_secs(14));
    (first, state_of(node, client, port))
}

// ---------------------------------------------------------------------------
// 2. UDP against the outside budget
// ---------------------------------------------------------------------------

/// One burst of faked-source UDP datagrams (one per source, `limit + 16`
/// of them, sent once) to a UDP node port takes UDP's share of the outside
/// budget for `conntrack_udp_idle_seconds`, but not TCP's: outside TCP
/// clients and the pods are still served (R29-1: the budget was shared,
/// and every outside client, TCP included, was dropped for the UDP timer).
#[test]
fn a_udp_burst_from_faked_sources_leaves_outside_tcp_clients_served() {
    require_root!();
    let lab =
        outside_lab("native", "conntrack_max_entries = 2048\nconntrack_udp_idle_seconds = 30\n", |lab| {
            np_service(&[lab.backends[0].ip], "Local")
        });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt29-client", OUTSIDE);
    assert_eq!(ask(&outside, NODE_A, TCP_NP).unwrap(), a2, "control: TCP from outside");
    assert_eq!(ask_udp(&outside, NODE_A, UDP_NP).unwrap(), a2, "control: UDP from outside");
    let limit = lab.a.inspect("config")["conntrack_max_outside"].as_u64().unwrap();
    // Let the control connections go (closing 10 s + sweep) is not needed:
    // they are answered TCP (not counted) and one UDP flow (counted).
    let attacker = outside_host("rt29-x", ATTACKER);
    let n = limit as usize + 16;
    let burst: Vec<Ipv4> = (0..n)
        .map(|i| {
            let src = [10, 250, 0, 100 + (i / 1000) as u8];
            Ipv4::udp(src, 20000 + (i % 1000) as u16, NODE_A.octets(), UDP_NP, b"who\n", true)
        })
        .collect();
    let before = lab.a.drop_count("conntrack_outside_limit");
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, burst)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let tcp_ok = connects(&outside, NODE_A, TCP_NP, 5);
    let udp_ok = (0..5).filter(|_| ask_udp(&outside, NODE_A, UDP_NP).is_ok()).count();
    let pods_ok = connects(&lab.client.netns, VIP, 80, 5);
    let dropped = lab.a.drop_count("conntrack_outside_limit") - before;
    eprintln!(
        "burst of {n} faked UDP datagrams (limit {limit}): outside TCP {tcp_ok}/5, outside UDP {udp_ok}/5, \
         pod {pods_ok}/5, conntrack_outside_limit +{dropped}, tracked {}",
        rows(&lab.a).len()
    );
    assert_eq!(pods_ok, 5, "pods keep their share");
    assert_eq!(tcp_ok, 5, "one burst of {n} UDP datagrams locked outside TCP clients out");
}

// ---------------------------------------------------------------------------
// 1. TCP sequence checks: legit closes
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 1. TCP sequence checks: forged segments with a known tuple
// ---------------------------------------------------------------------------

/// Ack poisoning: a host on the segment that knows the tuple of a pod's
/// ClusterIP connection to node B's backend (native mode) forges ACKs as
/// the backend with 256 acknowledgement numbers 16 MiB apart: one moves
/// the recorded acknowledgement (by design, 1 in 256 per blind guess).
/// Then the client aborts for real (an RST at the exact place): does the
/// connection still close here, or is it left established (6 h timer)?
#[test]
fn a_poisoned_ack_keeps_a_really_reset_connection_established() {
    require_root!();
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    let base = "conntrack_closing_seconds = 1\nconntrack_half_closed_seconds = 2\n";
    lab.a.set_extra_config(&format!("{base}{}", np_service(&[b1], "Cluster")));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    let mut results = Vec::new();
    for poison in [false, true] {
        let mut conn =
            in_netns(&lab.client.netns.path(), || TcpStream::connect((VIP, 80)).unwrap()).join().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let port = conn.local_addr().unwrap().port();
        writeln!(conn, "who").unwrap();
        let mut line = String::new();
        BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(state_of(&lab.a, lab.client.ip, port).as_deref(), Some("established"));
        if poison {
            let attacker = outside_host("rt29-ack", ATTACKER);
            let acks: Vec<Ipv4> = (0..256u32)
                .map(|k| {
                    Ipv4::tcp(b1.octets(), 8080, lab.client.ip.octets(), port, TCP_ACK, &[])
                        .with_seq_ack(0x5555_0000, k << 24)
                })
                .collect();
            send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, acks)).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        // The client's real abort: SO_LINGER 0 sends an RST at the exact place.
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
        drop(conn);
        let (first, later) = state_after_close(&lab.a, lab.client.ip, port);
        eprintln!("poison={poison}: after the client's real RST: +1 s {first:?}, +15 s {later:?}");
        results.push(later);
    }
    assert_eq!(results[0], None, "control: a real RST closes the connection");
    assert_eq!(results[1], None, "a forged ACK (1 in 256 blind) left a reset connection established here");
}

// ---------------------------------------------------------------------------
// 1. The handshake ACK check, swept
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 3. conntrack_max_outside bounds
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 4. Reused tuples and the outside count
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// 6. Outside clients that complete their handshakes
// ---------------------------------------------------------------------------

/// One outside host (its own address, real sockets) opens 1,100
/// connections to a node port and holds them idle: answered connections
/// leave `conntrack_max_outside`, so it takes the whole 1,024-connection
/// table (each for the 6 h idle timer). Do the pods keep "the other half"
/// (docs: at most conntrack_max_entries / 4 "so the pods always keep the
/// other half")?
#[test]
fn held_open_outside_connections_take_the_pods_half_of_the_table() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    assert_eq!(connects(&lab.client.netns, VIP, 80, 5), 5, "control");
    let outside = outside_host("rt29-hold", OUTSIDE);
    let held = in_netns(&outside.path(), move || {
        let mut conns = Vec::new();
        // (Until 20 in a row are refused: each waits its 300 ms.)
        let mut refused_in_a_row = 0;
        for _ in 0..1100 {
            match TcpStream::connect_timeout(&(NODE_A, TCP_NP).into(), Duration::from_millis(300)) {
                Ok(c) => {
                    conns.push(c);
                    refused_in_a_row = 0;
                }
                Err(_) if refused_in_a_row == 20 => break,
                Err(_) => refused_in_a_row += 1,
            }
        }
        conns
    })
    .join()
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let established = rows(&lab.a).iter().filter(|r| r["state"] == "established").count();
    let pods_ok = connects(&lab.client.netns, VIP, 80, 20);
    let full = lab.a.drop_count("conntrack_full");
    eprintln!(
        "outside host holds {} connections ({established} established rows, outside count {}); pod served {pods_ok}/20; conntrack_full {full}",
        held.len(),
        outside_count_raw(&lab.a)
    );
    drop(held);
    assert_eq!(pods_ok, 20, "an outside host's held-open connections took the pods' half of the table");
    let limit = lab.a.inspect("config")["conntrack_max_outside"].as_u64().unwrap();
    assert!(
        established as u64 <= limit,
        "{established} held from outside, past conntrack_max_outside {limit}"
    );
    assert!(lab.a.drop_count("conntrack_outside_limit") > 0, "the ones past it were dropped");
}

/// `inner` (an IPv4 packet) in VXLAN (VNI 1, port 8472) from node B's
/// address to node A's, as a frame from the attacker's MAC: what a host on
/// the segment forges in VXLAN mode (nothing authenticates the tunnel).
fn forged_vxlan_frame(attacker: &Netns, node: &Node, outer_src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let inner_frame = ethernet([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2], ETH_P_IP, inner);
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&inner_frame);
    let outer = Ipv4::udp(outer_src.octets(), 41000, node.node_ip.octets(), 8472, &vx, false);
    ethernet(mac_of(&node.netns, UPLINK), mac_of(attacker, "eth0"), ETH_P_IP, &outer.bytes())
}

/// Ack poisoning generalised: `mode` (in VXLAN mode the forged ACKs come
/// in a VXLAN datagram with node B's address as outer source), and the
/// client's close: "rst" (abort) or "fin" (normal close, the backend
/// closes too). Control connection first, then a poisoned one.
fn poison(mode: &str, close: &str) {
    let mut lab = lab(mode);
    let b1 = lab.backends[1].ip;
    let base = "conntrack_closing_seconds = 1\n";
    lab.a.set_extra_config(&format!("{base}{}", np_service(&[b1], "Cluster")));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    let attacker = outside_host("rt29-ack", ATTACKER);
    let mut results = Vec::new();
    for poisoned in [false, true] {
        let mut conn =
            in_netns(&lab.client.netns.path(), || TcpStream::connect((VIP, 80)).unwrap()).join().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let port = conn.local_addr().unwrap().port();
        writeln!(conn, "who").unwrap();
        let mut line = String::new();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        reader.read_line(&mut line).unwrap();
        assert_eq!(state_of(&lab.a, lab.client.ip, port).as_deref(), Some("established"));
        if poisoned {
            let frames: Vec<Vec<u8>> = (0..256u32)
                .map(|k| {
                    let ack = Ipv4::tcp(b1.octets(), 8080, lab.client.ip.octets(), port, TCP_ACK, &[])
                        .with_seq_ack(0x5555_0000, k << 24)
                        .bytes();
                    if mode == "vxlan" {
                        forged_vxlan_frame(&attacker, &lab.a, lab.b.node_ip, &ack)
                    } else {
                        ethernet(mac_of(&lab.a.netns, UPLINK), mac_of(&attacker, "eth0"), ETH_P_IP, &ack)
                    }
                })
                .collect();
            send_raw_frames(&attacker, "eth0", frames).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
        if close == "rst" {
            socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
            drop(reader);
            drop(conn);
        } else {
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = String::new();
            let _ = reader.read_to_string(&mut rest);
            drop(conn);
        }
        let (first, later) = state_after_close(&lab.a, lab.client.ip, port);
        eprintln!(
            "{mode} {close} poisoned={poisoned}: after the client's real close: +1 s {first:?}, +15 s {later:?}"
        );
        results.push(later);
    }
    let overlay = lab.a.inspect("counters")["drops_by_direction"]["from_overlay"].clone();
    eprintln!("{mode}: from_overlay drops {overlay}");
    assert_eq!(results[0], None, "control: a real {close} closes the connection");
    assert_eq!(
        results[1], None,
        "{mode}: 256 forged ACKs left a really closed ({close}) connection in the table"
    );
}

#[test]
fn ack_poisoning_then_client_abort_native() {
    require_root!();
    poison("native", "rst");
}

#[test]
fn ack_poisoning_then_normal_close_native() {
    require_root!();
    poison("native", "fin");
}

#[test]
fn ack_poisoning_then_client_abort_vxlan() {
    require_root!();
    poison("vxlan", "rst");
}

#[test]
fn ack_poisoning_then_normal_close_vxlan() {
    require_root!();
    poison("vxlan", "fin");
}

/// After a poisoned connection was really reset (and so left established
/// here), the client reconnects from the same port: a SYN on an
/// established tuple is not a new connection here, so the new connection
/// inherits the stale (poisoned) acknowledgement: does its normal close
/// still close it?
#[test]
fn a_poisoned_entry_outlives_its_connection_and_swallows_the_next_close_on_its_tuple() {
    require_root!();
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.a.set_extra_config(&format!("conntrack_closing_seconds = 1\n{}", np_service(&[b1], "Cluster")));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    let attacker = outside_host("rt29-ack2", ATTACKER);
    let open_from = |port: u16| ask_from_port(&lab.client.netns.path(), port);
    let port = 47000;
    let (conn, _) = open_from(port).unwrap();
    let acks: Vec<Ipv4> = (0..256u32)
        .map(|k| {
            Ipv4::tcp(b1.octets(), 8080, lab.client.ip.octets(), port, TCP_ACK, &[])
                .with_seq_ack(0x5555_0000, k << 24)
        })
        .collect();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, acks)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
    drop(conn);
    let (first, later) = state_after_close(&lab.a, lab.client.ip, port);
    eprintln!("poisoned, then reset: +1 s {first:?}, +15 s {later:?}");
    // The next connection on the same tuple, closed normally by both ends.
    let again = open_from(port);
    let ok = again.as_ref().map(|(_, backend)| *backend).map_err(|e| e.to_string());
    eprintln!("reconnect from port {port}: {ok:?}; state {:?}", state_of(&lab.a, lab.client.ip, port));
    if let Ok((mut c, _)) = again {
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = String::new();
        let _ = c.read_to_string(&mut rest);
        drop(c);
    }
    let (first2, later2) = state_after_close(&lab.a, lab.client.ip, port);
    eprintln!("the next connection on the tuple, closed normally: +1 s {first2:?}, +15 s {later2:?}");
    assert_eq!(later2, None, "a normal close on a tuple once poisoned left it in the table");
}

/// The native lab with node A's agent serving the VIP from backend 1 only
/// (policy Cluster); backends 1 and 2.
fn lab_served_by_b1() -> (Lab, Ipv4Addr, Ipv4Addr) {
    let mut lab = lab("native");
    let (b1, b2) = (lab.backends[1].ip, lab.backends[2].ip);
    lab.a.set_extra_config(&np_service(&[b1], "Cluster"));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    (lab, b1, b2)
}

/// A connection from the namespace at `netns`, source port `port`, to the
/// VIP's port 80 (3 s to connect), and the backend that answered "who" on it.
fn ask_from_port(netns: &std::path::Path, port: u16) -> std::io::Result<(TcpStream, Ipv4Addr)> {
    in_netns(netns, move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).unwrap();
        s.connect_timeout(&SocketAddr::from((VIP, 80)).into(), Duration::from_secs(3))?;
        let mut c: TcpStream = s.into();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        writeln!(c, "who")?;
        let mut line = String::new();
        BufReader::new(c.try_clone()?).read_line(&mut line)?;
        Ok::<_, std::io::Error>((c, parse_answer(&line).0))
    })
    .join()
    .unwrap()
}

/// The backend leaves the Service (b1 -> b2) while a client's connection
/// on a tuple is closing (reset, `conntrack_closing_seconds` 10): the
/// client reconnects from the same port. netfilter kills a CLOSE entry on
/// a new SYN and makes a new NAT decision (b2); here "the backend stays".
/// Then the same with a poisoned tuple (left established after its reset),
/// 20 s later.
#[test]
fn a_reconnect_on_a_closed_or_poisoned_tuple_goes_to_a_backend_that_left() {
    require_root!();
    let (mut lab, b1, b2) = lab_served_by_b1();
    let attacker = outside_host("rt29-ack3", ATTACKER);
    let netns = lab.client.netns.path();
    let open_from = move |port: u16| ask_from_port(&netns, port);
    let abort = |c: TcpStream| {
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
    };
    // Tuple 1: plain reset. Tuple 2: poisoned, then reset.
    let (c1, first1) = open_from(47201).unwrap();
    let (c2, first2) = open_from(47202).unwrap();
    let acks: Vec<Ipv4> = (0..256u32)
        .map(|k| {
            Ipv4::tcp(b1.octets(), 8080, lab.client.ip.octets(), 47202, TCP_ACK, &[])
                .with_seq_ack(0x5555_0000, k << 24)
        })
        .collect();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, acks)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    abort(c1);
    abort(c2);
    lab.a.set_extra_config(&np_service(&[b2], "Cluster"));
    wait_served(&lab.a, VIP, 80, &[b2]);
    let again1 = open_from(47201).map(|(c, b)| {
        abort(c);
        b
    });
    eprintln!("reset tuple, reconnect right after b1 left: first {first1}, now {again1:?} (b2 = {b2})");
    std::thread::sleep(Duration::from_secs(20));
    let again2 = open_from(47202).map(|(c, b)| {
        abort(c);
        b
    });
    let fresh = open_from(47203).map(|(c, b)| {
        abort(c);
        b
    });
    eprintln!(
        "poisoned tuple 20 s after b1 left: first {first2}, now {again2:?}; a fresh port: {fresh:?}; state {:?}",
        state_of(&lab.a, lab.client.ip, 47202)
    );
    assert_eq!(
        again2.ok(),
        Some(b2),
        "a poisoned tuple keeps sending new connections to a backend that left"
    );
    assert_eq!(again1.ok(), Some(b2), "a reconnect on a closed tuple went to a backend that left");
}

/// R29-5's remainder: the backend leaves while a client's connection is
/// still open (the Service sync leaves a live connection alone); the
/// client then closes it normally and reconnects from the same port within
/// the closing timer (`conntrack_closing_seconds`, 10 s). The collector's
/// next sweep (every 5 s) forgets the closed connection to the backend
/// that left, so the reconnect picks one that serves, as netfilter's new
/// NAT decision on such a SYN would. (Before, the closed entry sent it to
/// the backend that left for the whole closing timer.)
#[test]
fn a_reconnect_after_a_connection_closed_once_its_backend_left_goes_to_one_that_serves() {
    require_root!();
    let (mut lab, b1, b2) = lab_served_by_b1();
    let netns = lab.client.netns.path();
    // The client closes first, so its port waits in TIME_WAIT: let the
    // reconnect reuse it (after 1 s, with timestamps), as a busy client's would.
    in_netns(&netns, || std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").unwrap()).join().unwrap();
    let open_from = move |port: u16| ask_from_port(&netns, port);
    let port = 47211;
    let (mut c, first) = open_from(port).unwrap();
    assert_eq!(first, b1, "control: the one backend answers");
    lab.a.set_extra_config(&np_service(&[b2], "Cluster"));
    wait_served(&lab.a, VIP, 80, &[b2]);
    assert_eq!(
        state_of(&lab.a, lab.client.ip, port).as_deref(),
        Some("established"),
        "a live connection to the backend that left is kept"
    );
    // Closed normally by both ends.
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    let _ = c.read_to_string(&mut rest);
    drop(c);
    let closed = Instant::now();
    while state_of(&lab.a, lab.client.ip, port).is_some() && closed.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let forgotten_after = closed.elapsed();
    let state = state_of(&lab.a, lab.client.ip, port);
    eprintln!("closed connection to the backend that left: {state:?} after {forgotten_after:?}");
    assert_eq!(state, None, "the closed connection to a backend that left is still tracked 8 s on");
    // Within the closing timer (10 s from the close): the entry would still be there.
    std::thread::sleep(Duration::from_millis(1100).saturating_sub(forgotten_after));
    let again = open_from(port).map(|(c, b)| {
        drop(c);
        b
    });
    eprintln!("reconnect from port {port} {:?} after the close: {again:?} (b2 = {b2})", closed.elapsed());
    assert_eq!(again.ok(), Some(b2), "a reconnect on the closed tuple went to the backend that left");
}

/// The same at the default table size (conntrack_max_outside 16,384, UDP's
/// share 8,192): one burst of 16,400 faked datagrams (R29-1).
#[test]
fn a_udp_burst_at_default_sizes_leaves_outside_tcp_clients_served() {
    require_root!();
    let lab = outside_lab("native", "", |lab| np_service(&[lab.backends[0].ip], "Local"));
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt29-client", OUTSIDE);
    assert_eq!(ask(&outside, NODE_A, TCP_NP).unwrap(), a2, "control: TCP from outside");
    let limit = lab.a.inspect("config")["conntrack_max_outside"].as_u64().unwrap();
    let attacker = outside_host("rt29-x", ATTACKER);
    let n = limit as usize + 16;
    let burst: Vec<Ipv4> = (0..n)
        .map(|i| {
            let src = [10, 250, 0, 100 + (i / 1000) as u8];
            Ipv4::udp(src, 20000 + (i % 1000) as u16, NODE_A.octets(), UDP_NP, b"who\n", true)
        })
        .collect();
    let t = Instant::now();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, burst)).unwrap();
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let tcp_ok = connects(&outside, NODE_A, TCP_NP, 5);
    let udp_ok = (0..5).filter(|_| ask_udp(&outside, NODE_A, UDP_NP).is_ok()).count();
    let pods_ok = connects(&lab.client.netns, VIP, 80, 5);
    eprintln!(
        "default sizes: burst of {n} faked datagrams (limit {limit}) sent in {took:?}: outside TCP {tcp_ok}/5, \
         UDP {udp_ok}/5, pod {pods_ok}/5; conntrack_outside_limit {}",
        lab.a.drop_count("conntrack_outside_limit")
    );
    assert_eq!(tcp_ok, 5, "one burst of {n} UDP datagrams locked outside TCP clients out");
    assert_eq!(pods_ok, 5, "pods keep their share");
}

/// A server on `ip:BULK_PORT` that reads to EOF, waits `delay`, writes
/// `reply` bytes and closes (the client half-closed and waits).
pub(super) fn delayed_server(ns: &Netns, ip: Ipv4Addr, delay: Duration, reply: usize) {
    let listener = in_netns(&ns.path(), move || TcpListener::bind((ip, BULK_PORT)).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
                std::thread::sleep(delay);
                let _ = conn.write_all(&vec![5u8; reply]);
            });
        }
    });
}

/// A half-closed NodePort connection (the outside client sent its request
/// and shut down writing; the backend answers 8 s later), and a host on
/// the segment that forges one SYN (any sequence number) on its tuple. A
/// SYN on a half-closed tuple is no reconnect (netfilter ignores it too):
/// the state stays half-closed and the late answer reaches the client
/// (R29-2; before: reset to opening, counted again, the answer lost to the
/// 2 s opening timer).
#[test]
fn a_forged_syn_leaves_a_half_closed_node_port_tuple_alone() {
    require_root!();
    forged_syn_on_half_closed(false);
}

/// Blind: the attacker does not know the client's port and sprays one SYN
/// at every port of Linux's ephemeral range (32768-60999) from the client's
/// address (opening timer 2 s, the answer 8 s later): the half-closed
/// connection is left alone (R29-2).
#[test]
fn a_blind_syn_spray_leaves_half_closed_node_port_connections_alone() {
    require_root!();
    forged_syn_on_half_closed(true);
}

/// The half-closed connection with and without the forged SYN (one on its
/// tuple, or `spray`ed at every ephemeral port), opening timer 2 s.
fn forged_syn_on_half_closed(spray: bool) {
    let lab = outside_lab("native", "conntrack_opening_seconds = 2\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    delayed_server(&lab.backends[0].netns, a2, Duration::from_secs(8), 1 << 20);
    wait_served(&lab.a, NODE_A, BULK_NP, &[a2]);
    let outside = outside_host("rt29-half", OUTSIDE);
    let attacker = outside_host("rt29-halfx", ATTACKER);
    let mut results = Vec::new();
    for forge in [false, true] {
        let (tx, rx) = std::sync::mpsc::channel();
        let client = in_netns(&outside.path(), move || {
            let mut conn = TcpStream::connect((NODE_A, BULK_NP)).unwrap();
            tx.send(conn.local_addr().unwrap().port()).unwrap();
            conn.write_all(b"request").unwrap();
            conn.shutdown(std::net::Shutdown::Write).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut got = 0;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => return Ok(got),
                    Ok(n) => got += n,
                    Err(e) => return Err(format!("{e} after {got} bytes")),
                }
            }
        });
        let port = rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let before = state_of(&lab.a, OUTSIDE, port);
        let count_before = outside_count_raw(&lab.a);
        if forge {
            let ports: Vec<u16> = if spray { (32768..=60999).collect() } else { vec![port] };
            let syns: Vec<Ipv4> = ports
                .into_iter()
                .map(|p| {
                    Ipv4::tcp(OUTSIDE.octets(), p, NODE_A.octets(), BULK_NP, TCP_SYN, &[])
                        .with_seq_ack(0x0bad_5eed, 0)
                })
                .collect();
            let n = syns.len();
            let t = Instant::now();
            send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, syns)).unwrap();
            eprintln!("{n} forged SYNs sent in {:?} (client port {port})", t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = state_of(&lab.a, OUTSIDE, port);
        let count_after = outside_count_raw(&lab.a);
        let got = client.join().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        eprintln!(
            "after the answer: row {:?}, outside count {}",
            row_of(&lab.a, OUTSIDE, port).map(|r| r["state"].clone()),
            outside_count_raw(&lab.a)
        );
        eprintln!(
            "forged SYN {forge}: state {before:?} -> {after:?}; outside count {count_before} -> {count_after}; client got {got:?}"
        );
        results.push(got);
    }
    assert_eq!(results[0], Ok(1 << 20), "control");
    assert_eq!(results[1], Ok(1 << 20), "one forged SYN on a half-closed tuple broke the answer");
}

/// A targeted lock-out: a host on the segment forges 1,100 SYNs from one
/// chosen outside client's address (unused source ports) to a node port.
/// Outside clients are not held per address, so the victim is still
/// served (R29-6: the per-client limit of 1,024 unanswered connections,
/// outside clients included, refused the victim's own connections until
/// the forged ones were gone; netfilter has no such limit).
#[test]
fn forged_syns_from_a_victims_address_leave_that_client_served() {
    require_root!();
    victim_lockout(false);
}

/// The same, the victim behind a stateful firewall that drops SYN-ACKs it
/// did not ask for (no RST back): the forged connections stay opening for
/// `conntrack_opening_seconds` (60 s), and the victim is still served
/// (R29-6: it was locked out that long).
#[test]
fn forged_syns_leave_a_firewalled_victim_served() {
    require_root!();
    victim_lockout(true);
}

fn victim_lockout(firewalled: bool) {
    let lab = outside_lab("native", "", |lab| np_service(&[lab.backends[0].ip], "Local"));
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let victim = outside_host("rt29-victim", OUTSIDE);
    assert_eq!(ask(&victim, NODE_A, TCP_NP).unwrap(), a2, "control");
    if firewalled {
        victim.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ]);
        victim.exec(&[
            "iptables",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--tcp-flags",
            "SYN,ACK",
            "SYN,ACK",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
    }
    let attacker = outside_host("rt29-victimx", ATTACKER);
    let syns: Vec<Ipv4> = (2000..3100u16)
        .map(|p| Ipv4::tcp(OUTSIDE.octets(), p, NODE_A.octets(), TCP_NP, TCP_SYN, &[]))
        .collect();
    let before = lab.a.drop_count("conntrack_client_limit");
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, syns)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let served = connects(&victim, NODE_A, TCP_NP, 5);
    let other = outside_host("rt29-bystander", Ipv4Addr::new(10, 250, 0, 51));
    let bystander = connects(&other, NODE_A, TCP_NP, 5);
    eprintln!(
        "1100 SYNs forged from {OUTSIDE}: victim served {served}/5, another outside host {bystander}/5; \
         conntrack_client_limit +{}",
        lab.a.drop_count("conntrack_client_limit") - before
    );
    assert_eq!(served, 5, "a forged burst from a victim's address locked it out");
    assert_eq!(bystander, 5, "another outside host is served too");
}
