//! ClusterIP Services in the lab, in both modes: two nodes, a client pod and
//! backend pods on both nodes made by the real CNI plugin, Services from the
//! agent's config file (applied live), real TCP and UDP sockets. The client
//! must only ever see the Service address.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use datapath_tests::{
    in_both_modes,
    lab::{Fabric, Netns, Node, Pod, in_netns, peered_nodes},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SELF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const CLOSED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const SLOW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const VOID_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 15);
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

pub(super) struct Lab {
    // Drop order: servers, pods, nodes, fabric.
    _servers: Vec<Server>,
    pub(super) client: Pod,
    pub(super) backends: Vec<Pod>,
    pub(super) a: Node,
    pub(super) b: Node,
    _fabric: Fabric,
}

/// Client a1 on node A; backends a2 (node A), b1 and b2 (node B), each
/// answering on TCP 8080 and UDP 5353 with "<its address> <peer address>".
pub(super) fn lab(mode: &str) -> Lab {
    let fabric = Fabric::new();
    let (a, b) = peered_nodes(&fabric, mode);
    let client = a.add_pod("a1");
    let backends = vec![a.add_pod("a2"), b.add_pod("b1"), b.add_pod("b2")];
    let servers = backends.iter().map(|p| Server::start(&p.netns, p.ip)).collect();
    Lab { _servers: servers, client, backends, a, b, _fabric: fabric }
}

impl Lab {
    /// Services on both nodes' config (only the client's node needs them;
    /// a real cluster configures every node alike).
    pub(super) fn set_services(&mut self, services: &str) {
        self.a.set_extra_config(services);
        self.b.set_extra_config(services);
    }

    pub(super) fn backend_ips(&self) -> Vec<Ipv4Addr> {
        self.backends.iter().map(|p| p.ip).collect()
    }
}

/// A `[[services]]` entry with a TCP port 80 -> 8080 and a UDP port 53 -> 5353.
pub(super) fn service(name: &str, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"{name}\"\ncluster_ip = \"{vip}\"\nbackends = [{}]\n\
         [[services.ports]]\nport = 80\ntarget_port = {TCP_PORT}\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = {UDP_PORT}\n",
        list.join(", ")
    )
}

/// Wait until `node` has programmed `vip`'s TCP port 80 with exactly `backends`.
pub(super) fn wait_programmed(node: &Node, vip: Ipv4Addr, backends: &[Ipv4Addr]) {
    wait_served(node, vip, 80, backends);
}

/// Wait until `node` serves `address:port`/TCP with exactly `backends`.
pub(super) fn wait_served(node: &Node, vip: Ipv4Addr, port: u16, backends: &[Ipv4Addr]) {
    let mut want: Vec<String> = backends.iter().map(|ip| ip.to_string()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let services = node.inspect("services");
        // (A node's address at a node port has two entries, one for
        // clients outside and one for the cluster's: either may be meant.)
        let served = services.as_array().unwrap().iter().any(|s| {
            let mut have: Vec<String> = s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["ip"].as_str().unwrap().to_owned())
                .collect();
            have.sort();
            s["cluster_ip"] == vip.to_string()
                && s["port"] == port
                && s["protocol"].as_str() == Some("TCP")
                && have == want
        });
        if served {
            return;
        }
        assert!(Instant::now() < deadline, "{vip}:{port} not programmed with {want:?}: {services:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A backend's servers, stopped on drop.
pub(super) struct Server {
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(ns: &Netns, ip: Ipv4Addr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tcp, udp) = in_netns(&ns.path(), move || {
            (TcpListener::bind((ip, TCP_PORT)).unwrap(), UdpSocket::bind((ip, UDP_PORT)).unwrap())
        })
        .join()
        .unwrap();
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        std::thread::spawn(move || answer_lines(conn, ip, peer));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    // As long as the query: a big query gets a big answer
                    // (both in IP fragments).
                    let mut answer = format!("{ip} {}\n", peer.ip()).into_bytes();
                    answer.resize(answer.len().max(n), b'.');
                    let _ = udp.send_to(&answer, peer);
                }
            }
        });
        Server { stop }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub(super) fn answer_lines(conn: TcpStream, ip: Ipv4Addr, peer: SocketAddr) {
    conn.set_nonblocking(false).unwrap();
    let mut writer = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        if line.is_err() || writeln!(writer, "{ip} {}", peer.ip()).is_err() {
            return;
        }
    }
}

/// A TCP connection opened from the client pod (usable from any thread).
pub(super) fn connect(client: &Pod, vip: Ipv4Addr) -> std::io::Result<TcpStream> {
    in_netns(&client.netns.path(), move || {
        TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(3))
    })
    .join()
    .unwrap()
}

/// One request on a connection: (backend address, client address it saw).
fn ask(conn: &mut TcpStream) -> (Ipv4Addr, Ipv4Addr) {
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    writeln!(conn, "who").unwrap();
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).expect("answer");
    parse_answer(&line)
}

pub(super) fn parse_answer(line: &str) -> (Ipv4Addr, Ipv4Addr) {
    let mut words = line.split_whitespace();
    let backend = words.next().expect("backend").parse().unwrap();
    let seen = words.next().expect("peer").parse().unwrap();
    (backend, seen)
}

/// One UDP query from a fresh socket: (backend, address the reply came from).
fn ask_udp(client: &Pod, vip: Ipv4Addr) -> std::io::Result<(Ipv4Addr, SocketAddr)> {
    ask_udp_sized(client, vip, 3).map(|(backend, from, _)| (backend, from))
}

/// A UDP query of `size` bytes from a fresh socket (the backend answers as
/// many): (backend, address the reply came from, reply size).
fn ask_udp_sized(client: &Pod, vip: Ipv4Addr, size: usize) -> std::io::Result<(Ipv4Addr, SocketAddr, usize)> {
    in_netns(&client.netns.path(), move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut query = b"who\n".to_vec();
        query.resize(size.max(query.len()), b'?');
        socket.send_to(&query[..size], (vip, 53))?;
        let mut buf = vec![0u8; 65_536];
        let (n, from) = socket.recv_from(&mut buf)?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Ok((parse_answer(text.lines().next().unwrap_or_default()).0, from, n))
    })
    .join()
    .unwrap()
}

fn spread_over_backends(mode: &str) {
    let mut lab = lab(mode);
    let backends = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &backends));
    wait_programmed(&lab.a, WEB_VIP, &backends);

    let mut tcp_seen = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let mut conn = connect(&lab.client, WEB_VIP).expect("connect to the Service");
        assert_eq!(conn.peer_addr().unwrap(), SocketAddr::from((WEB_VIP, 80)));
        let (backend, client_seen) = ask(&mut conn);
        assert!(backends.contains(&backend), "answer from {backend}");
        assert_eq!(client_seen, lab.client.ip, "no NAT of the client: the backend sees the pod");
        *tcp_seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(tcp_seen.len(), backends.len(), "TCP connections reached every backend: {tcp_seen:?}");

    let mut udp_seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (backend, from) = ask_udp(&lab.client, WEB_VIP).expect("UDP answer");
        assert_eq!(from, SocketAddr::from((WEB_VIP, 53)), "the reply comes from the Service");
        udp_seen.insert(backend);
    }
    assert_eq!(udp_seen.len(), backends.len(), "UDP queries reached every backend: {udp_seen:?}");

    // Datagrams bigger than the MTU travel in IP fragments both ways; only
    // the first fragment has ports, the others follow its translation.
    let mut big_seen = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let (backend, from, size) =
            ask_udp_sized(&lab.client, WEB_VIP, 4000).expect("answer to a 4000-byte query");
        assert_eq!(from, SocketAddr::from((WEB_VIP, 53)), "the fragmented reply comes from the Service");
        assert_eq!(size, 4000, "the whole reply, reassembled");
        big_seen.insert(backend);
    }
    assert!(
        big_seen.iter().any(|b| *b != lab.backends[0].ip),
        "fragmented queries reached a backend on the other node: {big_seen:?}"
    );

    // What the agent shows: live connections, each behind the Service.
    let mut conn = connect(&lab.client, WEB_VIP).unwrap();
    let (backend, _) = ask(&mut conn);
    let local_port = conn.local_addr().unwrap().port();
    let conntrack = lab.a.inspect("conntrack");
    let entry = conntrack
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_port"] == local_port && c["protocol"] == "TCP")
        .unwrap_or_else(|| panic!("connection from port {local_port} in {conntrack:#}"));
    assert_eq!(entry["client_ip"], lab.client.ip.to_string());
    assert_eq!(entry["service_ip"], WEB_VIP.to_string());
    assert_eq!(entry["backend_ip"], backend.to_string());
    assert_eq!(entry["backend_port"], TCP_PORT);
}

in_both_modes! { tcp_and_udp_spread_over_backends_on_both_nodes => spread_over_backends; }

fn hairpin_and_refusal(mode: &str) {
    let mut lab = lab(mode);
    let itself = lab.backends[0].ip;
    lab.set_services(&format!(
        "{}{}",
        service("itself", SELF_VIP, &[itself]),
        service("nobody", EMPTY_VIP, &[])
    ));
    wait_programmed(&lab.a, SELF_VIP, &[itself]);
    wait_programmed(&lab.a, EMPTY_VIP, &[]);

    // The backend pod reaches itself through its own Service.
    let mut conn = connect(&lab.backends[0], SELF_VIP).expect("pod to itself through its Service");
    let (backend, seen) = ask(&mut conn);
    assert_eq!(backend, itself);
    assert_eq!(seen, Ipv4Addr::new(169, 254, 42, 1), "from the hairpin address, not its own");
    let (backend, from) = ask_udp(&lab.backends[0], SELF_VIP).expect("UDP to itself");
    assert_eq!((backend, from), (itself, SocketAddr::from((SELF_VIP, 53))));

    // No backends: refused at once, not a timeout.
    let started = Instant::now();
    let err = connect(&lab.client, EMPTY_VIP).expect_err("nothing behind the Service");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused after {:?}", started.elapsed());
    let udp = in_netns(&lab.client.netns.path(), || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((EMPTY_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.send(b"who").unwrap();
        socket.recv(&mut [0u8; 10]).map(|_| ())
    })
    .join()
    .unwrap();
    assert_eq!(udp.expect_err("UDP refused").kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(lab.a.drop_count("service_no_backend"), 2, "each refusal counted with its reason");

    // A backend whose port is closed: its kernel's port unreachable reaches
    // the client about the Service, so the connected socket fails at once
    // instead of waiting for its timeout. Local and remote backends.
    for backend in [lab.backends[0].ip, lab.backends[1].ip] {
        lab.set_services(&format!(
            "\n[[services]]\nname = \"closed\"\ncluster_ip = \"{CLOSED_VIP}\"\nbackends = [\"{}\"]\n\
             [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = {}\n",
            backend,
            UDP_PORT + 1
        ));
        wait_programmed_udp(&lab.a, CLOSED_VIP, backend);
        let started = Instant::now();
        let udp = in_netns(&lab.client.netns.path(), || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect((CLOSED_VIP, 53)).unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            socket.send(b"who").unwrap();
            socket.recv(&mut [0u8; 10]).map(|_| ())
        })
        .join()
        .unwrap();
        let err = udp.expect_err("nothing listens behind the Service");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{mode}, backend {backend}: {err}");
        assert!(started.elapsed() < Duration::from_secs(1), "refused after {:?}", started.elapsed());
    }
}

/// Wait until `node` has programmed `vip`'s UDP port 53 with `backend`.
fn wait_programmed_udp(node: &Node, vip: Ipv4Addr, backend: Ipv4Addr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let services = node.inspect("services");
        let programmed = services.as_array().unwrap().iter().any(|s| {
            s["cluster_ip"] == vip.to_string()
                && s["protocol"].as_str() == Some("UDP")
                && s["backends"].as_array().unwrap().iter().any(|b| b["ip"] == backend.to_string())
        });
        if programmed {
            return;
        }
        assert!(Instant::now() < deadline, "{vip}/UDP not programmed with {backend}: {services:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

in_both_modes! { pod_reaches_itself_and_an_empty_service_refuses_at_once => hairpin_and_refusal; }

fn backend_changes(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);

    let mut long = connect(&lab.client, WEB_VIP).unwrap();
    let (kept, _) = ask(&mut long);
    // Remove every other backend: the long connection's backend stays.
    lab.set_services(&service("web", WEB_VIP, &[kept]));
    wait_programmed(&lab.a, WEB_VIP, &[kept]);
    assert_eq!(ask(&mut long).0, kept, "the long connection survives");
    for _ in 0..10 {
        let mut conn = connect(&lab.client, WEB_VIP).unwrap();
        assert_eq!(ask(&mut conn).0, kept, "new connections only go to the remaining backend");
    }
    // Add them back: new connections reach them again, the long one stays.
    lab.set_services(&service("web", WEB_VIP, &all));
    wait_programmed(&lab.a, WEB_VIP, &all);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        seen.insert(ask(&mut connect(&lab.client, WEB_VIP).unwrap()).0);
    }
    assert_eq!(seen.len(), all.len(), "re-added backends get new connections: {seen:?}");
    for _ in 0..10 {
        assert_eq!(ask(&mut long).0, kept, "the long connection kept its backend");
    }
}

in_both_modes! { backends_removed_and_added_while_a_long_connection_runs => backend_changes; }

fn conntrack_full(mode: &str) {
    use aya::maps::{HashMap, Map, MapData};
    use datapath_agent::bpf::PinLayout;
    use datapath_common::{ConntrackEntry, ConntrackKey, map_names};

    let mut lab = lab(mode);
    let all = lab.backend_ips();
    let limits = "conntrack_max_entries = 1024\nconntrack_closing_seconds = 1\n";
    // conntrack_max_entries sizes the map when it is created: restart.
    lab.a.stop_agent();
    lab.a.set_extra_config(&format!("{limits}{}", service("web", WEB_VIP, &all)));
    std::fs::remove_file(PinLayout::new(&lab.a.bpffs_dir).map(map_names::CONNTRACK)).unwrap();
    lab.a.start_agent();
    wait_programmed(&lab.a, WEB_VIP, &all);
    let mut old = connect(&lab.client, WEB_VIP).unwrap();
    let (backend, _) = ask(&mut old);

    // Fill the rest with live-looking entries of other connections.
    let pin = PinLayout::new(&lab.a.bpffs_dir).map(map_names::CONNTRACK);
    let mut map: HashMap<MapData, ConntrackKey, ConntrackEntry> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap())).unwrap();
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let mut filled = 0u32;
    for i in 0u32.. {
        let b = i.to_be_bytes();
        let key = ConntrackKey {
            saddr: [10, 244, 9, b[3]],
            daddr: WEB_VIP.octets(),
            sport: [b[2], b[1]],
            dport: 80u16.to_be_bytes(),
            protocol: 6,
            _pad: [0; 3],
        };
        let entry = ConntrackEntry { last_seen_ns: now_ns, nat_addr: backend.octets(), ..Default::default() };
        if map.insert(key, entry, 0).is_err() {
            break;
        }
        filled += 1;
    }
    assert!((1000..1024).contains(&filled), "filled {filled} entries next to the live connection");

    let started = Instant::now();
    let err = connect(&lab.client, WEB_VIP).expect_err("a new connection while the map is full");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(lab.a.drop_count("conntrack_full"), 1, "refused with its reason");
    assert_eq!(ask(&mut old).0, backend, "the old connection goes on");

    // Closing it frees its entries: the GC works on a full map too.
    let local_port = old.local_addr().unwrap().port();
    old.shutdown(std::net::Shutdown::Both).unwrap();
    drop(old);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.a.inspect("conntrack").as_array().unwrap().iter().any(|c| c["client_port"] == local_port) {
        assert!(Instant::now() < deadline, "closed connection still tracked after 20 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut conn = connect(&lab.client, WEB_VIP).expect("room again for one connection");
    assert!(all.contains(&ask(&mut conn).0));
}

in_both_modes! { a_full_conntrack_refuses_new_connections_and_keeps_old_ones => conntrack_full; }

fn client_ip_affinity(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    let sticky = service("web", WEB_VIP, &all).replacen(
        "backends =",
        "session_affinity = \"ClientIP\"\nsession_affinity_timeout_seconds = 300\nbackends =",
        1,
    );
    lab.set_services(&sticky);
    wait_programmed(&lab.a, WEB_VIP, &all);
    let first = ask(&mut connect(&lab.client, WEB_VIP).unwrap()).0;
    for _ in 0..20 {
        let mut conn = connect(&lab.client, WEB_VIP).unwrap();
        assert_eq!(ask(&mut conn).0, first, "ClientIP affinity: every connection to the same backend");
    }
    let services = lab.a.inspect("services");
    let web = services.as_array().unwrap().iter().find(|s| s["cluster_ip"] == WEB_VIP.to_string()).unwrap();
    assert_eq!(web["session_affinity"], "ClientIP");
    // Its backend leaves the Service: the affinity goes with it.
    let rest: Vec<Ipv4Addr> = all.iter().copied().filter(|ip| *ip != first).collect();
    lab.set_services(&service("web", WEB_VIP, &rest).replacen(
        "backends =",
        "session_affinity = \"ClientIP\"\nbackends =",
        1,
    ));
    wait_programmed(&lab.a, WEB_VIP, &rest);
    let next = ask(&mut connect(&lab.client, WEB_VIP).unwrap()).0;
    assert!(rest.contains(&next), "a remaining backend, not {first}");
    for _ in 0..10 {
        assert_eq!(ask(&mut connect(&lab.client, WEB_VIP).unwrap()).0, next, "sticky again");
    }
}

in_both_modes! { client_ip_affinity_keeps_a_client_on_one_backend => client_ip_affinity; }

/// A client that half-closes (`shutdown(SHUT_WR)`) still hears a server
/// that answers long after: one FIN is half-closed, not closing, and the
/// connection keeps its translation past `conntrack_closing_seconds` (1 s
/// here) and the collector's sweeps. Both FINs then close it.
fn half_closed(mode: &str) {
    let mut lab = lab(mode);
    let backend_ip = lab.backends[1].ip;
    let listener =
        in_netns(&lab.backends[1].netns.path(), move || TcpListener::bind((backend_ip, 9090)).unwrap())
            .join()
            .unwrap();
    // Reads until the client's FIN, waits 8 s (past the closing limit and
    // a sweep), then answers and closes.
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = String::new();
        std::io::Read::read_to_string(&mut conn, &mut request).unwrap();
        std::thread::sleep(Duration::from_secs(8));
        write!(conn, "late answer to {request}").unwrap();
    });
    lab.set_services(&format!(
        "conntrack_closing_seconds = 1\n\n[[services]]\nname = \"slow\"\ncluster_ip = \"{SLOW_VIP}\"\n\
         backends = [\"{}\"]\n[[services.ports]]\nport = 80\ntarget_port = 9090\n",
        lab.backends[1].ip
    ));
    wait_programmed(&lab.a, SLOW_VIP, &[lab.backends[1].ip]);
    let mut conn = connect(&lab.client, SLOW_VIP).unwrap();
    conn.write_all(b"question").unwrap();
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let port = conn.local_addr().unwrap().port();
    let state = || {
        let rows = lab.a.inspect("conntrack");
        rows.as_array().unwrap().iter().find(|c| c["client_port"] == port).map(|c| c["state"].clone())
    };
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(), Some(serde_json::json!("half_closed")));
    conn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).expect("the late answer");
    assert_eq!(answer, "late answer to question", "{mode}");
    server.join().unwrap();
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(15);
    while state().is_some() {
        assert!(Instant::now() < deadline, "closed both ways, still tracked: {:?}", state());
        std::thread::sleep(Duration::from_millis(500));
    }
}

in_both_modes! { a_half_closed_connection_hears_a_late_answer => half_closed; }

/// One pod flooding a Service with SYNs nobody answers cannot deny
/// Services to the other pods of its node: it is held to
/// `conntrack_max_per_client` unanswered connections (refused past them,
/// counted as `conntrack_client_limit`) while another pod keeps opening
/// connections, none refused; its half-open entries go after
/// `conntrack_opening_seconds`. The client's own many short connections
/// do not count against it: they were answered.
#[test]
fn a_syn_flood_from_one_pod_leaves_services_to_the_others() {
    use datapath_agent::bpf::PinLayout;
    use datapath_common::map_names;
    use datapath_tests::{
        lab::{mac_of, send_raw_frames_in},
        packets::{ETH_P_IP, Ipv4, TCP_SYN, ethernet},
    };
    datapath_tests::require_root!();
    let mut lab = lab("native");
    let all = lab.backend_ips();
    let flooder = lab.a.add_pod("a3");
    // 2048 entries (1024 connections); the default limit is an eighth of
    // the entries here: 256. The void Service's backend is an address of
    // the peer's pod CIDR that no pod has: nothing ever answers.
    let nobody = Ipv4Addr::new(10, 244, 2, 250);
    lab.a.stop_agent();
    lab.a.set_extra_config(&format!(
        "conntrack_max_entries = 2048\nconntrack_opening_seconds = 2\n{}{}",
        service("web", WEB_VIP, &all),
        service("void", VOID_VIP, &[nobody])
    ));
    std::fs::remove_file(PinLayout::new(&lab.a.bpffs_dir).map(map_names::CONNTRACK)).unwrap();
    lab.a.start_agent();
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, VOID_VIP, &[nobody]);
    assert_eq!(lab.a.inspect("config")["conntrack_max_per_client"], 256);

    let (pod_mac, host_mac) = (mac_of(&flooder.netns, "eth0"), mac_of(&lab.a.netns, &flooder.host_veth));
    let syns: Vec<Vec<u8>> = (0..3000u16)
        .map(|i| {
            let syn = Ipv4::tcp(flooder.ip.octets(), 10_000 + i, VOID_VIP.octets(), 80, TCP_SYN, &[]);
            ethernet(host_mac, pod_mac, ETH_P_IP, &syn.bytes())
        })
        .collect();
    let path = flooder.netns.path();
    let flood = std::thread::spawn(move || send_raw_frames_in(&path, "eth0", syns));
    let mut refused = 0;
    for _ in 0..300 {
        match connect(&lab.client, WEB_VIP) {
            Ok(mut conn) => assert!(all.contains(&ask(&mut conn).0)),
            Err(e) => {
                eprintln!("refused: {e}");
                refused += 1;
            }
        }
    }
    flood.join().unwrap().unwrap();
    for _ in 0..50 {
        match connect(&lab.client, WEB_VIP) {
            Ok(mut conn) => assert!(all.contains(&ask(&mut conn).0)),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, 0, "the other pod's connections during and after the flood");
    let of_flooder = || {
        let rows = lab.a.inspect("conntrack");
        rows.as_array().unwrap().iter().filter(|c| c["client_ip"] == flooder.ip.to_string()).count()
    };
    let held = of_flooder();
    // (A count lost to a race between CPUs lets a few more in.)
    assert!((250..=270).contains(&held), "the flooder holds its limit, not the table: {held}");
    let limited = lab.a.drop_count("conntrack_client_limit");
    assert!(limited >= 2700, "the rest refused with its reason: {limited}");
    assert_eq!(lab.a.drop_count("conntrack_full"), 0);
    // Unanswered, they go after conntrack_opening_seconds (and a sweep).
    let deadline = Instant::now() + Duration::from_secs(15);
    while of_flooder() > 0 {
        assert!(Instant::now() < deadline, "half-open entries still tracked: {}", of_flooder());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The node's own sockets (its processes, hostNetwork pods) reach Services
/// through the socket programs: connect() and sendmsg() go straight to a
/// backend on either node, getpeername() and recvmsg() show the Service,
/// and no packet is translated (nothing in the connection table). An empty
/// Service refuses at once. Pods keep the packet path meanwhile.
fn host_clients(mode: &str) {
    let mut lab = lab(mode);
    let all = lab.backend_ips();
    lab.set_services(&format!("{}{}", service("web", WEB_VIP, &all), service("nobody", EMPTY_VIP, &[])));
    wait_programmed(&lab.a, WEB_VIP, &all);
    wait_programmed(&lab.a, EMPTY_VIP, &[]);
    let node = lab.a.netns.path();

    let mut tcp_seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let (peer, backend) = in_netns(&node, || {
            let mut conn = TcpStream::connect_timeout(&(WEB_VIP, 80).into(), Duration::from_secs(3))
                .expect("the node connects to the Service");
            let peer = conn.peer_addr().unwrap();
            (peer, ask(&mut conn).0)
        })
        .join()
        .unwrap();
        assert_eq!(peer, SocketAddr::from((WEB_VIP, 80)), "{mode}: getpeername shows the Service");
        tcp_seen.insert(backend);
    }
    assert_eq!(
        tcp_seen.len(),
        all.len(),
        "{mode}: the node's connections reached every backend: {tcp_seen:?}"
    );

    // UDP: unconnected (recvmsg shows the Service) and connected.
    let mut udp_seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (backend, from) = in_netns(&node, || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            socket.send_to(b"who\n", (WEB_VIP, 53)).unwrap();
            let mut buf = [0u8; 512];
            let (n, from) = socket.recv_from(&mut buf).expect("a UDP answer");
            (parse_answer(&String::from_utf8_lossy(&buf[..n])).0, from)
        })
        .join()
        .unwrap();
        assert_eq!(from, SocketAddr::from((WEB_VIP, 53)), "{mode}: the answer comes from the Service");
        udp_seen.insert(backend);
    }
    assert_eq!(udp_seen.len(), all.len(), "{mode}: UDP reached every backend: {udp_seen:?}");
    let (peer, answered) = in_netns(&node, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect((WEB_VIP, 53)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send(b"who\n").unwrap();
        let mut buf = [0u8; 512];
        (socket.peer_addr().unwrap(), socket.recv(&mut buf).map(|n| n > 0))
    })
    .join()
    .unwrap();
    assert_eq!(peer, SocketAddr::from((WEB_VIP, 53)));
    assert!(answered.expect("a connected UDP socket hears its backend"));

    // Dual-stack sockets (AF_INET6) to the IPv4-mapped Service address, as
    // Java's and many other runtimes' are.
    let mapped = WEB_VIP.to_ipv6_mapped();
    let (peer, backend) = in_netns(&node, move || {
        let mut conn = TcpStream::connect_timeout(&(mapped, 80).into(), Duration::from_secs(3))
            .expect("a dual-stack socket connects to the Service");
        let peer = conn.peer_addr().unwrap();
        (peer, ask(&mut conn).0)
    })
    .join()
    .unwrap();
    assert_eq!(peer, SocketAddr::from((mapped, 80)), "{mode}: getpeername shows the mapped Service");
    assert!(all.contains(&backend));
    let (from, answered) = in_netns(&node, move || {
        let socket = UdpSocket::bind("[::]:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        socket.send_to(b"who\n", (mapped, 53)).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = socket.recv_from(&mut buf).expect("a UDP answer on a dual-stack socket");
        (from, n > 0)
    })
    .join()
    .unwrap();
    assert_eq!(from, SocketAddr::from((mapped, 53)), "{mode}: from the mapped Service");
    assert!(answered);

    // No per-packet translation: the node's connections are not tracked.
    let conntrack = lab.a.inspect("conntrack");
    assert!(
        conntrack.as_array().unwrap().iter().all(|c| c["service_ip"] != WEB_VIP.to_string()),
        "{mode}: {conntrack:#}"
    );
    // Nothing behind a Service: refused at once.
    let started = Instant::now();
    let err = in_netns(&node, || TcpStream::connect_timeout(&(EMPTY_VIP, 80).into(), Duration::from_secs(3)))
        .join()
        .unwrap()
        .expect_err("nothing behind the Service");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{mode}: {err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // A pod still goes through the packet path.
    let (_, seen) = ask(&mut connect(&lab.client, WEB_VIP).unwrap());
    assert_eq!(seen, lab.client.ip);
}

in_both_modes! { the_nodes_own_sockets_reach_services_through_the_socket_programs => host_clients; }
