//! Red team, round 29: the TCP sequence checks on Service connections, the
//! outside budget (`conntrack_max_outside`) now also holding UDP, its
//! config bounds, reused tuples, attacked from outside (a host on the
//! nodes' segment, a careless operator). Each test prints what it measured
//! (`--nocapture`); assertions state what the docs promise.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Netns, Node, UPLINK, in_netns, mac_of, send_raw_frames},
    packets::{ETH_P_IP, Ipv4, TCP_ACK, TCP_SYN, ethernet},
    require_root, sh,
};

use super::{
    redteam_policy::outside_host,
    services::{Lab, lab, parse_answer, wait_served},
};

const TCP_RST: u8 = 0x04;
const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 66);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 29, 10);
const TCP_NP: u16 = 30080;
const UDP_NP: u16 = 30053;
const BULK_PORT: u16 = 9000;
const BULK_NP: u16 = 30090;

// ---------------------------------------------------------------------------
// Lab
// ---------------------------------------------------------------------------

/// The services lab with both agents restarted on `settings` (plus
/// `serve_outside_clients = true`), then `services` added live.
fn outside_lab(mode: &str, settings: &str, services: impl Fn(&Lab) -> String) -> Lab {
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
fn np_service(backends: &[Ipv4Addr], policy: &str) -> String {
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
fn ask(host: &Netns, addr: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
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
fn ask_udp(host: &Netns, addr: Ipv4Addr, port: u16) -> std::io::Result<Ipv4Addr> {
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
fn connects(ns: &Netns, addr: Ipv4Addr, port: u16, tries: usize) -> usize {
    in_netns(&ns.path(), move || {
        (0..tries)
            .filter(|_| TcpStream::connect_timeout(&(addr, port).into(), Duration::from_millis(1500)).is_ok())
            .count()
    })
    .join()
    .unwrap()
}

fn rows(node: &Node) -> Vec<serde_json::Value> {
    node.inspect("conntrack").as_array().unwrap().clone()
}

fn row_of(node: &Node, client: Ipv4Addr, client_port: u16) -> Option<serde_json::Value> {
    rows(node).into_iter().find(|c| c["client_ip"] == client.to_string() && c["client_port"] == client_port)
}

fn state_of(node: &Node, client: Ipv4Addr, client_port: u16) -> Option<String> {
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

fn frames_from(attacker: &Netns, node: &Node, packets: Vec<Ipv4>) -> Vec<Vec<u8>> {
    let (node_mac, my_mac) = (mac_of(&node.netns, UPLINK), mac_of(attacker, "eth0"));
    packets.into_iter().map(|p| ethernet(node_mac, my_mac, ETH_P_IP, &p.bytes())).collect()
}

/// A bulk server in `ns` on `ip:BULK_PORT`: per connection, reads until
/// EOF, then writes `reply` bytes and closes.
fn bulk_server(ns: &Netns, ip: Ipv4Addr, reply: usize) {
    let listener = in_netns(&ns.path(), move || TcpListener::bind((ip, BULK_PORT)).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                let chunk = vec![9u8; 1 << 20];
                let mut left = reply;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if conn.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
}

/// From `ns`: connect to `addr:port`, write `up` bytes, shut down writing,
/// read to EOF (counting), close. Returns (local port, bytes read).
fn bulk_client(ns: &Netns, addr: Ipv4Addr, port: u16, up: usize) -> (u16, usize) {
    in_netns(&ns.path(), move || {
        let mut conn = TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(3)).unwrap();
        let local = conn.local_addr().unwrap().port();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut left = up;
        while left > 0 {
            let n = left.min(chunk.len());
            conn.write_all(&chunk[..n]).unwrap();
            left -= n;
        }
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("read: {e}"),
            }
        }
        (local, got)
    })
    .join()
    .unwrap()
}

/// The state of a connection over time after its end: (at +1 s, at +15 s).
fn state_after_close(node: &Node, client: Ipv4Addr, port: u16) -> (Option<String>, Option<String>) {
    std::thread::sleep(Duration::from_secs(1));
    let first = state_of(node, client, port);
    std::thread::sleep(Duration::from_secs(14));
    (first, state_of(node, client, port))
}

// ---------------------------------------------------------------------------
// 2. UDP against the outside budget
// ---------------------------------------------------------------------------

/// A trickle of faked-source UDP datagrams (one per source, `limit` of
/// them, sent once) to a UDP node port takes the whole outside budget for
/// `conntrack_udp_idle_seconds`: every new outside client of the node,
/// TCP included (the budget is shared), is dropped until the flows expire.
/// Measures how long one burst of `limit + 16` datagrams locks out a real
/// outside host.
#[test]
#[ignore = "R29-1: a UDP burst takes the whole outside budget, TCP included"]
fn a_one_off_udp_burst_locks_every_outside_client_out_for_the_udp_timer() {
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
    let sent_at = Instant::now();
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
    // How long until a real outside TCP client is served again (no more datagrams sent).
    let mut recovered = None;
    while sent_at.elapsed() < Duration::from_secs(60) {
        if ask(&outside, NODE_A, TCP_NP).is_ok() {
            recovered = Some(sent_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("outside TCP served again after {recovered:?} (udp timer 30 s)");
    assert_eq!(pods_ok, 5, "pods keep their share");
    assert!(tcp_ok > 0, "one burst of {n} UDP datagrams locked all outside TCP clients out");
}

// ---------------------------------------------------------------------------
// 1. TCP sequence checks: legit closes
// ---------------------------------------------------------------------------

/// Legit bulk transfers through a ClusterIP (pod client, remote backend)
/// and through a node port (outside client, source NAT to node B), each
/// closed normally by both ends: the connection must leave the table
/// (closing 10 s + sweep). Sizes: 64 MiB up then 64 MiB down.
fn bulk_closes(mode: &str, up: usize, down: usize) {
    let lab = outside_lab(mode, "conntrack_closing_seconds = 2\n", |lab| {
        np_service(&[lab.backends[1].ip], "Cluster")
    });
    let b1 = lab.backends[1].ip;
    bulk_server(&lab.backends[1].netns, b1, down);
    wait_served(&lab.a, VIP, 81, &[b1]);
    let t = Instant::now();
    let (port, got) = bulk_client(&lab.client.netns, VIP, 81, up);
    eprintln!("{mode} ClusterIP: {up} up, {got} down in {:?}", t.elapsed());
    let (first, later) = state_after_close(&lab.a, lab.client.ip, port);
    eprintln!("{mode} ClusterIP bulk: state +1 s {first:?}, +15 s {later:?}");
    let outside = outside_host("rt29-bulk", OUTSIDE);
    let t = Instant::now();
    let (oport, ogot) = bulk_client(&outside, NODE_A, BULK_NP, up);
    eprintln!("{mode} NodePort: {up} up, {ogot} down in {:?}", t.elapsed());
    let (ofirst, olater) = state_after_close(&lab.a, OUTSIDE, oport);
    eprintln!("{mode} NodePort bulk: state +1 s {ofirst:?}, +15 s {olater:?}");
    assert_eq!(later, None, "{mode}: a legit ClusterIP connection closed both ways lingers: {first:?}");
    assert_eq!(olater, None, "{mode}: a legit NodePort connection closed both ways lingers: {ofirst:?}");
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_bulk_transfer_closed_normally_leaves_the_table_native() {
    require_root!();
    bulk_closes("native", 256 << 20, 256 << 20);
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_bulk_transfer_closed_normally_leaves_the_table_vxlan() {
    require_root!();
    bulk_closes("vxlan", 256 << 20, 256 << 20);
}

// ---------------------------------------------------------------------------
// 1. TCP sequence checks: forged segments with a known tuple
// ---------------------------------------------------------------------------

/// A forged SYN (random sequence number) on the tuple of an established
/// NodePort connection, from a host on the segment faking the client:
/// netfilter ignores a SYN in ESTABLISHED (its kernel answers with a
/// challenge ACK); the connection must stay established here and keep
/// its translation after the opening timer.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_forged_syn_on_an_established_node_port_tuple_does_not_reopen_it() {
    require_root!();
    let lab = outside_lab("native", "conntrack_opening_seconds = 2\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt29-syn", OUTSIDE);
    let mut conn =
        in_netns(&outside.path(), || TcpStream::connect((NODE_A, TCP_NP)).unwrap()).join().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let port = conn.local_addr().unwrap().port();
    let mut lines = BufReader::new(conn.try_clone().unwrap());
    let mut ask_on = |conn: &mut TcpStream| -> std::io::Result<Ipv4Addr> {
        writeln!(conn, "who")?;
        let mut line = String::new();
        lines.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other("closed"));
        }
        Ok(parse_answer(&line).0)
    };
    assert_eq!(ask_on(&mut conn).unwrap(), a2);
    assert_eq!(state_of(&lab.a, OUTSIDE, port).as_deref(), Some("established"));
    let attacker = outside_host("rt29-synx", ATTACKER);
    let syn =
        Ipv4::tcp(OUTSIDE.octets(), port, NODE_A.octets(), TCP_NP, TCP_SYN, &[]).with_seq_ack(0x7777_0000, 0);
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, vec![syn])).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = state_of(&lab.a, OUTSIDE, port);
    std::thread::sleep(Duration::from_secs(10));
    let later = state_of(&lab.a, OUTSIDE, port);
    let answer = ask_on(&mut conn);
    eprintln!("forged SYN on established tuple: state {after:?}, 10 s later {later:?}, answer {answer:?}");
    assert_eq!(after.as_deref(), Some("established"), "a forged SYN reopened an established connection");
    assert_eq!(answer.ok(), Some(a2), "the connection broke after a forged SYN");
}

/// Ack poisoning: a host on the segment that knows the tuple of a pod's
/// ClusterIP connection to node B's backend (native mode) forges ACKs as
/// the backend with 256 acknowledgement numbers 16 MiB apart: one moves
/// the recorded acknowledgement (by design, 1 in 256 per blind guess).
/// Then the client aborts for real (an RST at the exact place): does the
/// connection still close here, or is it left established (6 h timer)?
#[test]
#[ignore = "R29-3: 256 forged ACKs make real RSTs/FINs ignored"]
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

/// The lab fabric's namespace (as `outside_host` finds it).
fn fabric_ns() -> String {
    let pid = std::process::id();
    sh(&["ip", "netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|name| name.starts_with(&format!("dpt{pid}x")) && name.ends_with("-fabric"))
        .expect("the lab's fabric namespace")
        .to_owned()
}

/// A slow link with a deep queue (bufferbloat: 200 Mbit/s, 8 MB queue) on
/// the fabric's ports toward node B (dptp1) and toward every outside host
/// (dptrt*): the data in flight of a bulk transfer sits there, past node
/// A's programs and before the receiver.
fn slow_links() {
    let fabric = fabric_ns();
    let links = sh(&["ip", "-n", &fabric, "-o", "link", "show"]);
    for name in links.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap()) {
        if name == "dptp1" || name.starts_with("dptrt") {
            sh(&[
                "ip", "netns", "exec", &fabric, "tc", "qdisc", "replace", "dev", name, "root", "tbf", "rate",
                "200mbit", "burst", "64kb", "limit", "8mb",
            ]);
        }
    }
}

/// A legit client outside, over a slow link with a deep queue, through a
/// node port to node B's backend (source NAT): upload `up` bytes then
/// close, the backend reads all and sends `down` bytes and closes. A FIN
/// more than 1 MiB past the receiver's acknowledgement (data queued on
/// the slow link) does not half-close the connection here: does a
/// connection both ends closed normally leave the table?
fn slow_bulk(up: usize, down: usize) {
    let lab = outside_lab("native", "conntrack_closing_seconds = 2\n", |lab| {
        np_service(&[lab.backends[1].ip], "Cluster")
    });
    let b1 = lab.backends[1].ip;
    bulk_server(&lab.backends[1].netns, b1, down);
    wait_served(&lab.a, NODE_A, BULK_NP, &[b1]);
    let outside = outside_host("rt29-slow", OUTSIDE);
    slow_links();
    let t = Instant::now();
    let (oport, got) = bulk_client(&outside, NODE_A, BULK_NP, up);
    eprintln!("slow link NodePort: {up} up, {got} down in {:?}", t.elapsed());
    std::thread::sleep(Duration::from_secs(1));
    let first = state_of(&lab.a, OUTSIDE, oport);
    std::thread::sleep(Duration::from_secs(14));
    let later = state_of(&lab.a, OUTSIDE, oport);
    eprintln!("slow link NodePort bulk ({up} up, {down} down): state +1 s {first:?}, +15 s {later:?}");
    assert_eq!(later, None, "a legit connection closed normally by both ends lingers here: {first:?}");
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn an_upload_over_a_slow_link_closed_normally_leaves_the_table() {
    require_root!();
    slow_bulk(48 << 20, 1);
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_download_over_a_slow_link_closed_normally_leaves_the_table() {
    require_root!();
    slow_bulk(1, 48 << 20);
}

// ---------------------------------------------------------------------------
// 1. The handshake ACK check, swept
// ---------------------------------------------------------------------------

/// A blind sweep: SYNs from faked sources (nobody answers ARP for them, so
/// their SYN-ACKs go nowhere), then for each, 65,536 ACKs whose
/// acknowledgement numbers are 64 KiB apart: one of them lands within
/// 64 KiB past the backend's SYN. Does the connection become answered
/// (`established`, idle timer 6 h, out of `conntrack_max_outside`)?
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_swept_handshake_ack_answers_a_faked_sources_connection() {
    require_root!();
    let lab = outside_lab("native", "conntrack_opening_seconds = 3\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let attacker = outside_host("rt29-sweep", ATTACKER);
    let faked: Vec<(Ipv4Addr, u16)> = (0..4).map(|i| (Ipv4Addr::new(10, 250, 0, 123 + i), 40000)).collect();
    let syns: Vec<Ipv4> = faked
        .iter()
        .map(|(ip, port)| Ipv4::tcp(ip.octets(), *port, NODE_A.octets(), TCP_NP, TCP_SYN, &[]))
        .collect();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, syns)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    eprintln!("after the SYNs: outside count {}", outside_count_raw(&lab.a));
    let t = Instant::now();
    for (ip, port) in &faked {
        let acks: Vec<Ipv4> = (0..65536u32)
            .map(|k| {
                Ipv4::tcp(ip.octets(), *port, NODE_A.octets(), TCP_NP, TCP_ACK, &[])
                    .with_seq_ack(datapath_tests::packets::TCP_ISN + 1, k << 16)
            })
            .collect();
        send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, acks)).unwrap();
    }
    eprintln!("{} ACKs sent in {:?}", 65536 * faked.len(), t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let states: Vec<_> = faked.iter().map(|(ip, port)| state_of(&lab.a, *ip, *port)).collect();
    eprintln!("after the sweep: {states:?}; outside count {}", outside_count_raw(&lab.a));
    std::thread::sleep(Duration::from_secs(15));
    let later: Vec<_> = faked.iter().map(|(ip, port)| state_of(&lab.a, *ip, *port)).collect();
    eprintln!("15 s later (opening timer 3 s): {later:?}; outside count {}", outside_count_raw(&lab.a));
    assert!(
        states.iter().chain(&later).all(|s| s.as_deref() != Some("established")),
        "a blind ACK sweep answered faked sources' connections: {states:?} {later:?}"
    );
    // Closing (the backend's RST to the ACKs), refreshed by the backend's
    // SYN-ACK retransmits (about 63 s), then closing 10 s and a sweep.
    let deadline = Instant::now() + Duration::from_secs(100);
    loop {
        let gone: Vec<_> = faked.iter().map(|(ip, port)| state_of(&lab.a, *ip, *port)).collect();
        if gone.iter().all(Option::is_none) {
            eprintln!("swept connections gone {:?} after the sweep", t.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "swept connections linger: {gone:?}");
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------
// 3. conntrack_max_outside bounds
// ---------------------------------------------------------------------------

/// Start an agent (no fabric) on `config`: Ok(conntrack_max_outside it runs
/// with) or Err(first log lines).
fn start_with(config: &str) -> Result<serde_json::Value, String> {
    let mut node = Node::new("10.244.9.0/24", Ipv4Addr::new(10, 250, 9, 1));
    node.set_extra_config(config);
    node.launch_agent(None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !node.agent_running() {
            let log = node.agent_log();
            return Err(log.lines().rev().take(3).collect::<Vec<_>>().join(" | "));
        }
        if node.socket.exists() {
            let c = node.inspect("config");
            return Ok(serde_json::json!({
                "max_outside": c["conntrack_max_outside"], "per_client": c["conntrack_max_per_client"]
            }));
        }
        assert!(Instant::now() < deadline, "agent neither up nor down: {}", node.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn conntrack_max_outside_edge_values() {
    require_root!();
    let cases: &[(&str, bool)] = &[
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 512\n", true),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 513\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 0\n", true),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = -1\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = \"16\"\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 16.5\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 4294967296\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outsde = 16\n", false),
        ("conntrack_max_outside = 32768\n", true),
        ("conntrack_max_outside = 32769\n", false),
        ("conntrack_max_entries = 1024\n", true),
        ("conntrack_max_entries = 1026\n", true),
        ("conntrack_max_entries = 1026\nconntrack_max_outside = 256\n", true),
        ("conntrack_max_entries = 1026\nconntrack_max_outside = 257\n", false),
        ("conntrack_max_entries = 2048\nconntrack_max_outside = 512\nserve_outside_clients = true\n", true),
        (
            "conntrack_max_entries = 2048\nconntrack_max_per_client = 1024\nconntrack_max_outside = 512\n",
            true,
        ),
    ];
    let mut wrong = Vec::new();
    for (config, ok) in cases {
        let got = start_with(config);
        eprintln!("{:?} -> {got:?}", config.replace('\n', "; "));
        if got.is_ok() != *ok {
            wrong.push(config.replace('\n', "; "));
        }
    }
    assert!(wrong.is_empty(), "unexpected outcome for: {wrong:?}");
}

/// A live config change to an invalid `conntrack_max_outside` (the agent
/// polls its file): the agent must keep running on what it has.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn an_invalid_conntrack_max_outside_in_a_live_reload() {
    require_root!();
    let mut node = Node::new("10.244.9.0/24", Ipv4Addr::new(10, 250, 9, 1));
    node.set_extra_config("conntrack_max_entries = 2048\nconntrack_max_outside = 100\n");
    node.start_agent();
    for bad in
        ["conntrack_max_outside = 513\n", "conntrack_max_outside = -3\n", "conntrack_max_outside = 200\n"]
    {
        node.set_extra_config(&format!("conntrack_max_entries = 2048\n{bad}"));
        std::thread::sleep(Duration::from_secs(4));
        let running = node.agent_running();
        let now = if running {
            node.inspect("config")["conntrack_max_outside"].clone()
        } else {
            serde_json::Value::Null
        };
        eprintln!("live {bad:?}: running {running}, programs' limit {now}");
        assert!(running, "the agent died on a live change: {}", node.agent_log());
    }
    let log = node.agent_log();
    for l in log.lines().filter(|l| l.contains("outside")) {
        eprintln!("  log: {l}");
    }
}

// ---------------------------------------------------------------------------
// 4. Reused tuples and the outside count
// ---------------------------------------------------------------------------

/// A real outside client that reconnects from one fixed port, each time
/// aborting (RST), 40 times in a row, then the same with a normal close;
/// then SYN retransmits and RST/SYN loops on faked tuples. The programs'
/// outside count (key 0.0.0.0 of conntrack_clients) must stay what the
/// table holds (unanswered outside connections), before the sweep heals it.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn reused_tuples_keep_the_outside_count_true() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt29-reuse", OUTSIDE);
    eprintln!("start: outside count {}", outside_count_raw(&lab.a));
    let t = Instant::now();
    let fails = in_netns(&outside.path(), move || {
        use socket2::{Domain, Socket, Type};
        let mut fails = 0;
        for _ in 0..40 {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 45000)).into()).unwrap();
            if s.connect_timeout(&SocketAddr::from((NODE_A, TCP_NP)).into(), Duration::from_millis(1500))
                .is_err()
            {
                fails += 1;
                continue;
            }
            let mut c: TcpStream = s.into();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = writeln!(c, "who");
            let mut line = String::new();
            let _ = BufReader::new(c.try_clone().unwrap()).read_line(&mut line);
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
        }
        fails
    })
    .join()
    .unwrap();
    eprintln!(
        "40 RST-closed reconnects from port 45000 in {:?}: {fails} failed; outside count {}; row {:?}",
        t.elapsed(),
        outside_count_raw(&lab.a),
        state_of(&lab.a, OUTSIDE, 45000)
    );
    // Faked tuples: SYN x3 (retransmits), RST, SYN x3 again, for 50 sources.
    let attacker = outside_host("rt29-reusex", ATTACKER);
    let mut pkts = Vec::new();
    for i in 0..50u16 {
        let src = [10, 250, 0, 130];
        let syn = Ipv4::tcp(src, 41000 + i, NODE_A.octets(), TCP_NP, TCP_SYN, &[]);
        let rst = Ipv4::tcp(src, 41000 + i, NODE_A.octets(), TCP_NP, TCP_RST, &[]);
        pkts.extend([syn.clone(), syn.clone(), syn.clone(), rst.clone(), syn.clone(), syn.clone(), rst, syn]);
    }
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, pkts)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let from_faked = rows(&lab.a).iter().filter(|r| r["client_ip"] == "10.250.0.130").count();
    let states: std::collections::BTreeMap<String, usize> = rows(&lab.a)
        .iter()
        .filter(|r| r["client_ip"] == "10.250.0.130")
        .fold(Default::default(), |mut m, r| {
            *m.entry(r["state"].as_str().unwrap().to_owned()).or_default() += 1;
            m
        });
    eprintln!(
        "50 faked tuples SYN/RST/SYN: {from_faked} rows {states:?}; outside count {}",
        outside_count_raw(&lab.a)
    );
    std::thread::sleep(Duration::from_secs(6));
    eprintln!("after a sweep: outside count {}", outside_count_raw(&lab.a));
}

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
#[ignore = "R29-4: answered outside connections have no budget"]
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
        for _ in 0..1100 {
            if let Ok(c) = TcpStream::connect_timeout(&(NODE_A, TCP_NP).into(), Duration::from_millis(300)) {
                conns.push(c);
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
#[ignore = "R29-3: 256 forged ACKs: real RST ignored, left established"]
fn ack_poisoning_then_client_abort_native() {
    require_root!();
    poison("native", "rst");
}

#[test]
#[ignore = "R29-3: 256 forged ACKs: real FIN ignored, left half_closed"]
fn ack_poisoning_then_normal_close_native() {
    require_root!();
    poison("native", "fin");
}

#[test]
#[ignore = "R29-3: 256 forged ACKs: real RST ignored, left established"]
fn ack_poisoning_then_client_abort_vxlan() {
    require_root!();
    poison("vxlan", "rst");
}

#[test]
#[ignore = "R29-3: 256 forged ACKs: real FIN ignored, left half_closed"]
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
#[ignore = "R29-3: a poisoned entry captures the next connection on its tuple"]
fn a_poisoned_entry_outlives_its_connection_and_swallows_the_next_close_on_its_tuple() {
    require_root!();
    let mut lab = lab("native");
    let b1 = lab.backends[1].ip;
    lab.a.set_extra_config(&format!("conntrack_closing_seconds = 1\n{}", np_service(&[b1], "Cluster")));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    let attacker = outside_host("rt29-ack2", ATTACKER);
    let open_from = |port: u16| {
        in_netns(&lab.client.netns.path(), move || {
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
            Ok::<_, std::io::Error>((c, line))
        })
        .join()
        .unwrap()
    };
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
    let ok = again.as_ref().map(|(_, l)| l.clone()).map_err(|e| e.to_string());
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

/// The backend leaves the Service (b1 -> b2) while a client's connection
/// on a tuple is closing (reset, `conntrack_closing_seconds` 10): the
/// client reconnects from the same port. netfilter kills a CLOSE entry on
/// a new SYN and makes a new NAT decision (b2); here "the backend stays".
/// Then the same with a poisoned tuple (left established after its reset),
/// 20 s later.
#[test]
#[ignore = "R29-3/R29-5: reconnects on a closed or poisoned tuple go to a backend that left"]
fn a_reconnect_on_a_closed_or_poisoned_tuple_goes_to_a_backend_that_left() {
    require_root!();
    let mut lab = lab("native");
    let (b1, b2) = (lab.backends[1].ip, lab.backends[2].ip);
    lab.a.set_extra_config(&np_service(&[b1], "Cluster"));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[b1]);
    let attacker = outside_host("rt29-ack3", ATTACKER);
    let netns = lab.client.netns.path();
    let open_from = move |port: u16| {
        let netns = netns.clone();
        in_netns(&netns, move || {
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
    };
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

/// Sequence numbers wrap: 5 GiB each way through a ClusterIP and a node
/// port (native), then a normal close: the connection must leave the table.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_transfer_that_wraps_the_sequence_space_still_closes() {
    require_root!();
    bulk_closes("native", 5 << 30, 5 << 30);
}

/// Hairpin connections (a pod reaching itself through its Service) that
/// nobody answers (the port is closed: RST): are they counted against the
/// outside budget (key 0.0.0.0) by the programs or the collector's recount?
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn hairpin_connections_do_not_count_as_outside() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = &lab.backends[0];
    wait_served(&lab.a, VIP, 81, &[a2.ip]);
    // Port 81 -> 9000, where a2 does not listen: each SYN gets an RST.
    let refused = in_netns(&a2.netns.path(), || {
        (0..60)
            .filter(|_| TcpStream::connect_timeout(&(VIP, 81).into(), Duration::from_millis(500)).is_err())
            .count()
    })
    .join()
    .unwrap();
    let hairpins = rows(&lab.a).iter().filter(|r| r["hairpin"] == true).count();
    eprintln!("{refused}/60 refused; {hairpins} hairpin rows; outside count {}", outside_count_raw(&lab.a));
    std::thread::sleep(Duration::from_secs(6));
    let count = outside_count_raw(&lab.a);
    eprintln!("after a sweep: outside count {count}; rows {}", rows(&lab.a).len());
    assert!(count.contains("\"connections\":0"), "hairpin connections counted as outside: {count}");
}

/// The UDP lock-out at the default table size (conntrack_max_outside
/// 16,384): one burst of 16,400 faked datagrams.
#[test]
#[ignore = "R29-1: a UDP burst takes the whole outside budget, TCP included"]
fn a_one_off_udp_burst_at_default_sizes() {
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
    assert!(tcp_ok > 0, "one burst of {n} UDP datagrams locked all outside TCP clients out");
}

const TFO_SERVER: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, 23, 16)  # TCP_FASTOPEN
s.bind((sys.argv[1], 9000)); s.listen(64)
def serve(c):
    f = c.makefile('rb')
    f.readline(); c.sendall(b'ok\n')
    while c.recv(4096): pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const TFO_CLIENT: &str = r#"
import socket, struct, sys
vip, mode = sys.argv[1], sys.argv[2]
for i in range(4):
    c = socket.socket()
    c.sendto(b'hello\n', 0x20000000, (vip, 81))  # MSG_FASTOPEN
    line = c.makefile('rb').readline()
    info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    opts = info[5]
    port = c.getsockname()[1]
    if mode == 'rst':
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    else:
        c.shutdown(socket.SHUT_WR); c.recv(100)
    c.close()
    print(port, 'syn_data' if opts & 32 else 'no_syn_data', 'syn_data_acked' if opts & 64 else '-', line.strip().decode())
"#;

/// TCP Fast Open through a ClusterIP (pod client, node B backend): data in
/// the SYN (cookie from the first connection), then a normal close or an
/// abort: each connection must leave the table.
fn tfo(mode: &str) {
    let mut lab = lab("native");
    let b1 = &lab.backends[1];
    let b1ip = b1.ip;
    lab.a.set_extra_config(&format!("conntrack_closing_seconds = 2\n{}", np_service(&[b1ip], "Cluster")));
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 81, &[b1ip]);
    for ns in [&lab.client.netns.name, &lab.backends[1].netns.name] {
        sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=3"]);
    }
    let mut server = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.backends[1].netns.name, "python3", "-c", TFO_SERVER, &b1ip.to_string()])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.client.netns.name, "python3", "-c", TFO_CLIENT, &VIP.to_string(), mode])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{mode}: {text}{}", String::from_utf8_lossy(&out.stderr));
    let nstat =
        sh(&["ip", "netns", "exec", &lab.backends[1].netns.name, "nstat", "-az", "TcpExtTCPFastOpen*"]);
    eprintln!(
        "server side: {}",
        nstat
            .lines()
            .filter(|l| !l.ends_with(" 0                  0.0") && l.contains("FastOpen"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    std::thread::sleep(Duration::from_secs(12));
    let mut left = Vec::new();
    for line in text.lines() {
        let port: u16 = line.split_whitespace().next().unwrap().parse().unwrap();
        let st = state_of(&lab.a, lab.client.ip, port);
        eprintln!("  port {port}: state 12 s after close: {st:?}");
        if st.is_some() {
            left.push((port, st));
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(text.lines().count(), 4, "all four TFO connections answered");
    assert!(left.is_empty(), "TFO connections left in the table after their {mode} close: {left:?}");
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn tcp_fast_open_connections_close_normally() {
    require_root!();
    tfo("fin");
}

#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn tcp_fast_open_connections_close_on_abort() {
    require_root!();
    tfo("rst");
}

/// A server on `ip:BULK_PORT` that reads to EOF, waits `delay`, writes
/// `reply` bytes and closes (the client half-closed and waits).
fn delayed_server(ns: &Netns, ip: Ipv4Addr, delay: Duration, reply: usize) {
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
    forged_syn_on_half_closed("conntrack_opening_seconds = 2\n");
}

/// The same at the default opening timer (60 s), the answer 8 s later:
/// what state the connection ends in, and whether the answer arrives.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn a_forged_syn_on_a_half_closed_node_port_tuple_default_timers() {
    require_root!();
    forged_syn_on_half_closed("");
}

/// Blind: the attacker does not know the client's port and sprays one SYN
/// at every port of Linux's ephemeral range (32768-60999) from the client's
/// address (opening timer 2 s, the answer 8 s later): the half-closed
/// connection is left alone (R29-2).
#[test]
fn a_blind_syn_spray_leaves_half_closed_node_port_connections_alone() {
    require_root!();
    forged_syn_on_half_closed_with("conntrack_opening_seconds = 2\n", true);
}

fn forged_syn_on_half_closed(settings: &str) {
    forged_syn_on_half_closed_with(settings, false);
}

fn forged_syn_on_half_closed_with(settings: &str, spray: bool) {
    let lab = outside_lab("native", settings, |lab| np_service(&[lab.backends[0].ip], "Local"));
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

/// A server on `ip:BULK_PORT` taking one command line per connection:
/// "abort" (reset), "bye" (shut down writing at once, read to EOF, close).
fn command_server(ns: &Netns, ip: Ipv4Addr) {
    let listener = in_netns(&ns.path(), move || TcpListener::bind((ip, BULK_PORT)).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let _ = reader.read_line(&mut line);
                if line.trim() == "abort" {
                    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
                    drop(reader);
                    drop(conn);
                } else {
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    let mut rest = Vec::new();
                    let _ = reader.read_to_end(&mut rest);
                }
            });
        }
    });
}

/// Legit endings through a ClusterIP (pod client) and a node port (outside
/// client, source NAT), both to node B's backend: the server resets, and
/// a near-simultaneous close (both shut down writing at once). Each must
/// leave the table (closing 2 s).
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn server_resets_and_simultaneous_closes_leave_the_table() {
    require_root!();
    let lab = outside_lab("native", "conntrack_closing_seconds = 2\n", |lab| {
        np_service(&[lab.backends[1].ip], "Cluster")
    });
    let b1 = lab.backends[1].ip;
    command_server(&lab.backends[1].netns, b1);
    wait_served(&lab.a, NODE_A, BULK_NP, &[b1]);
    let outside = outside_host("rt29-cmd", OUTSIDE);
    let mut left = Vec::new();
    for (who, ns, client_ip, addr, port) in
        [("pod", &lab.client.netns, lab.client.ip, VIP, 81), ("outside", &outside, OUTSIDE, NODE_A, BULK_NP)]
    {
        for cmd in ["abort", "bye"] {
            let local = in_netns(&ns.path(), move || {
                let mut c = TcpStream::connect((addr, port)).unwrap();
                let local = c.local_addr().unwrap().port();
                c.write_all(format!("{cmd}\n").as_bytes()).unwrap();
                if cmd == "bye" {
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                }
                c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut rest = Vec::new();
                let r = c.read_to_end(&mut rest);
                eprintln!("  {cmd}: client read {r:?}");
                local
            })
            .join()
            .unwrap();
            let (first, later) = state_after_close(&lab.a, client_ip, local);
            eprintln!("{who} {cmd}: +1 s {first:?}, +15 s {later:?}");
            if later.is_some() {
                left.push(format!("{who} {cmd}: {first:?} -> {later:?}"));
            }
        }
    }
    assert!(left.is_empty(), "legit endings left in the table: {left:?}");
}

/// Item 4 through source NAT: a real outside client reconnects 40 times
/// from one port to a node port whose backend is on node B, aborting each
/// time, then the reconnects interleaved with faked SYN retransmits on the
/// same tuple. The outside count must stay 0 (all answered) and one row.
#[test]
#[ignore = "red team round 29: held (stop 29 note); slow, run by hand with --ignored"]
fn reused_tuples_through_source_nat_keep_the_outside_count_true() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[1].ip], "Cluster")
    });
    let b1 = lab.backends[1].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[b1]);
    let outside = outside_host("rt29-snatreuse", OUTSIDE);
    let attacker = outside_host("rt29-snatreusex", ATTACKER);
    let mut fails = 0;
    for round in 0..40 {
        let ok = in_netns(&outside.path(), move || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.set_reuse_address(true).unwrap();
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 45100)).into()).unwrap();
            if s.connect_timeout(&SocketAddr::from((NODE_A, TCP_NP)).into(), Duration::from_millis(1500))
                .is_err()
            {
                return false;
            }
            let mut c: TcpStream = s.into();
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = writeln!(c, "who");
            let mut line = String::new();
            let ok = BufReader::new(c.try_clone().unwrap()).read_line(&mut line).is_ok() && !line.is_empty();
            socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
            ok
        })
        .join()
        .unwrap();
        if !ok {
            fails += 1;
        }
        if round % 4 == 3 {
            // A faked SYN retransmit on the closed tuple, then nothing.
            let syn = Ipv4::tcp(OUTSIDE.octets(), 45100, NODE_A.octets(), TCP_NP, TCP_SYN, &[]);
            send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, vec![syn.clone(), syn]))
                .unwrap();
        }
    }
    let mine: Vec<_> = rows(&lab.a).into_iter().filter(|r| r["client_ip"] == OUTSIDE.to_string()).collect();
    eprintln!(
        "40 reconnects via source NAT from port 45100: {fails} failed; rows {:?}; outside count {}",
        mine.iter().map(|r| (r["client_port"].clone(), r["state"].clone())).collect::<Vec<_>>(),
        outside_count_raw(&lab.a)
    );
    std::thread::sleep(Duration::from_secs(6));
    eprintln!("after a sweep: outside count {}", outside_count_raw(&lab.a));
    assert_eq!(fails, 0);
}

/// A targeted lock-out: a host on the segment forges 1,100 SYNs from one
/// chosen outside client's address (unused source ports) to a node port.
/// The per-client limit (1,024 unanswered connections per client address,
/// outside clients included) then refuses that client's own new
/// connections until the forged ones are gone (the real client resets the
/// SYN-ACKs it did not ask for: closing, still counted). netfilter has no
/// such limit: the client would be served.
#[test]
#[ignore = "R29-6: forged SYNs from a victim's address lock that outside client out"]
fn forged_syns_from_a_victims_address_lock_that_client_out() {
    require_root!();
    victim_lockout(false);
}

/// The same, the victim behind a stateful firewall that drops SYN-ACKs it
/// did not ask for (no RST back): the forged connections stay opening for
/// `conntrack_opening_seconds` (60 s).
#[test]
#[ignore = "R29-6: forged SYNs from a victim's address lock that outside client out"]
fn forged_syns_lock_out_a_firewalled_victim_for_the_opening_timer() {
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
    let t = Instant::now();
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
    let mut back = None;
    while t.elapsed() < Duration::from_secs(100) {
        if ask(&victim, NODE_A, TCP_NP).is_ok() {
            back = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("victim served again after {back:?}");
    assert_eq!(served, 5, "a forged burst from a victim's address locked it out");
}
