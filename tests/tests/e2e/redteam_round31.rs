//! Red team, round 31: early drop for clients outside (the queue of
//! outside TCP connections opened lately, four looked at), CNI DEL
//! forgetting a deleted pod's Service connections, and the day-2 features
//! (`--log-format json`, new `/metrics` series, the Node's
//! `NetworkUnavailable` condition). Attacked from outside: a host on the
//! nodes' segment, a racing runtime, a careless operator. Each test prints
//! what it measured (`--nocapture`); its assertions state what should hold,
//! so a finding is a failing (ignored) test.
//!
//! Findings: F1 (high, fixed) early drop looked only at the queue's four
//! oldest keys and dropped the new connection when none of them was
//! unanswered, so a queue head of answered connections
//! (`queue_head_of_answered_handshakes_locks_outside_clients_out`) or of
//! expired ones (`expired_fakes_at_the_queue_head_lock_clients_out_again`)
//! locked outside TCP clients out for ~64 s (now a ring of four times the
//! share, written and looked in at random: both tests pass); F2 (medium) clients whose
//! handshake takes longer than the flood needs for TCP's share are given
//! up (`clients_behind_latency_during_a_syn_flood`); F3 (low) the Node's
//! NetworkUnavailable condition set back to True is never cleared again
//! (`node_condition_set_back_to_true_is_cleared_again`). The rest held.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    bin_dir,
    kube_api::{FakeApiServer, node_object},
    lab::{Fabric, Netns, Node, http_get_local_with, in_netns, send_raw_frames},
    packets::{Ipv4, TCP_SYN},
    require_root, sh, wait_for,
};

use super::{
    observability::promtool_check,
    redteam_policy::outside_host,
    redteam_round29::{connects, frames_from, outside_lab, rows},
    redteam_round30::outside_count,
    services::{lab, wait_served},
};

const NODE_A: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 50);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 66);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 31, 10);
const DEAD_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 31, 11);
const TCP_NP: u16 = 30080;
const UDP_NP: u16 = 30053;
const TCP_RST: u8 = 0x04;
/// Early drop's ring at default sizes (twice TCP's share; the queue it
/// replaced held 32,768): as many connections as the ring has slots, less
/// the share, go first.
const QUEUE: usize = 16_384;
const API_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 254);

fn np_service(backends: &[Ipv4Addr], policy: &str) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"rt31\"\ncluster_ip = \"{VIP}\"\nexternal_traffic_policy = \"{policy}\"\n\
         backends = [{}]\n[[services.ports]]\nport = 80\ntarget_port = 8080\nnode_port = {TCP_NP}\n\
         [[services.ports]]\nport = 53\nprotocol = \"UDP\"\ntarget_port = 5353\nnode_port = {UDP_NP}\n",
        list.join(", ")
    )
}

/// Faked sources from `base` (10.250.0.base..): nobody answers ARP there.
fn faked_from(base: u8, i: usize) -> ([u8; 4], u16) {
    ([10, 250, 0, base + (i / 1000) as u8], 20000 + (i % 1000) as u16)
}

fn syns(base: u8, range: std::ops::Range<usize>) -> Vec<Ipv4> {
    range
        .map(|i| {
            let (s, p) = faked_from(base, i);
            Ipv4::tcp(s, p, NODE_A.octets(), TCP_NP, TCP_SYN, &[])
        })
        .collect()
}

/// Real handshakes from `host` to the node port, each aborted with an RST
/// right after (no TIME_WAIT): `n` answered outside connections.
fn handshakes(host: &Netns, n: usize) -> usize {
    in_netns(&host.path(), move || {
        let mut ok = 0;
        for _ in 0..n {
            if let Ok(c) = TcpStream::connect_timeout(&(NODE_A, TCP_NP).into(), Duration::from_millis(1500)) {
                socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)).unwrap();
                ok += 1;
            }
        }
        ok
    })
    .join()
    .unwrap()
}

/// After the share is full: does an outside client connect, and if not,
/// for how long is it refused (tries every 3 s, up to `cap`)?
fn lockout(node: &Node, outside: &Netns, t0: Instant, cap: Duration) -> (usize, Option<Duration>) {
    let first = connects(outside, NODE_A, TCP_NP, 5);
    let mut served_after = None;
    if first < 5 {
        while t0.elapsed() < cap {
            std::thread::sleep(Duration::from_secs(3));
            if connects(outside, NODE_A, TCP_NP, 1) == 1 {
                served_after = Some(t0.elapsed());
                break;
            }
        }
    }
    eprintln!(
        "outside client: {first}/5 at once; served again after {served_after:?}; outside tcp {:?}; \
         early drops {}, outside_limit drops {}",
        outside_count(node, "tcp"),
        node.drop_count("conntrack_early_drop"),
        node.drop_count("conntrack_outside_limit")
    );
    (first, served_after)
}

// ---------------------------------------------------------------------------
// 1. Early drop
// ---------------------------------------------------------------------------

/// Gaming the queue with connections that are not unanswered: first
/// `QUEUE - share` outside connections that do not count (`prefix`: real
/// handshakes from the attacker's own address, or SYN + RST pairs forged
/// from faked sources, no handshake needed), then exactly the share's worth
/// of SYNs from faked sources. The queue's four oldest are then never
/// unanswered, so a new client is dropped (`conntrack_outside_limit`)
/// until the head has been walked past, four per SYN, or the opening timer
/// ends. What should hold: a client is served at once.
fn queue_head_of_not_unanswered(prefix: &str) {
    let lab = outside_lab("native", "", |lab| np_service(&[lab.backends[0].ip], "Local"));
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt31-c", OUTSIDE);
    let attacker = outside_host("rt31-q", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let (_, limit) = outside_count(&lab.a, "tcp");
    let k = QUEUE - limit as usize;
    let t = Instant::now();
    let (made, bytes) = match prefix {
        "handshakes" => {
            // Two threads from the attacker's own address.
            let h: Vec<_> = (0..2).map(|_| handshakes(&attacker, k / 2)).collect();
            (h.iter().sum::<usize>(), k * 3 * 66)
        }
        _ => {
            let mut packets = Vec::with_capacity(2 * k);
            for i in 0..k {
                let (s, p) = faked_from(150, i);
                packets.push(Ipv4::tcp(s, p, NODE_A.octets(), TCP_NP, TCP_SYN, &[]));
                packets.push(Ipv4::tcp(s, p, NODE_A.octets(), TCP_NP, TCP_RST, &[]));
            }
            let bytes = packets.iter().map(|p| p.bytes().len() + 14).sum();
            send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
            (k, bytes)
        }
    };
    std::thread::sleep(Duration::from_millis(500));
    let (count, _) = outside_count(&lab.a, "tcp");
    eprintln!(
        "{prefix}: {made} prefix connections ({bytes} bytes) in {:?}; outside tcp count {count}/{limit}; rows {}",
        t.elapsed(),
        rows(&lab.a).len()
    );
    let fill = (limit - count.max(0)) as usize;
    let packets = syns(100, 0..fill);
    let fill_bytes: usize = packets.iter().map(|p| p.bytes().len() + 14).sum();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    eprintln!(
        "{prefix}: then {fill} SYNs ({fill_bytes} bytes); outside tcp {:?}",
        outside_count(&lab.a, "tcp")
    );
    let (first, served_after) = lockout(&lab.a, &outside, t0, Duration::from_secs(90));
    assert_eq!(
        first, 5,
        "{prefix}: {made} connections then {fill} faked SYNs locked outside TCP clients out for {served_after:?}"
    );
}

/// Finding F1 (high): 24,576 real handshakes from the attacker's own
/// address (what a busy node port's real clients also leave in the queue),
/// then 8,192 faked SYNs: outside TCP clients refused 0/5, for 64.5 s (34
/// `conntrack_outside_limit` drops, 0 early drops).
#[test]
fn queue_head_of_answered_handshakes_locks_outside_clients_out() {
    require_root!();
    queue_head_of_not_unanswered("handshakes");
}

#[test]
fn queue_head_of_forged_syn_rst_pairs_does_not_lock_outside_clients_out() {
    require_root!();
    queue_head_of_not_unanswered("syn+rst");
}

/// Remote backend (externalTrafficPolicy Cluster, source NAT to node B):
/// six bursts of TCP's share of faked SYNs (49k connections, more than a
/// source-NAT port range) while a client connects; then is the client
/// still served (source NAT ports of given-up connections freed), and do
/// the tracked rows stay within the share?
#[test]
fn early_drop_with_a_remote_backend_frees_source_nat_ports() {
    require_root!();
    let lab = outside_lab("native", "", |lab| np_service(&[lab.backends[1].ip], "Cluster"));
    let b1 = lab.backends[1].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[b1]);
    let outside = outside_host("rt31-r", OUTSIDE);
    let attacker = outside_host("rt31-s", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let sample = rows(&lab.a);
    eprintln!("a row: {}", sample.first().cloned().unwrap_or_default());
    let (_, limit) = outside_count(&lab.a, "tcp");
    let n = 6 * limit as usize;
    let frames = frames_from(&attacker, &lab.a, syns(100, 0..n));
    let before = lab.a.drop_count("conntrack_early_drop");
    let (during, took) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let t = Instant::now();
            send_raw_frames(&attacker, "eth0", frames).unwrap();
            t.elapsed()
        });
        let (mut served, mut tried) = (0, 0);
        while !flood.is_finished() || tried < 5 {
            tried += 1;
            served += connects(&outside, NODE_A, TCP_NP, 1);
        }
        (served * 100 / tried, flood.join().unwrap())
    });
    std::thread::sleep(Duration::from_millis(500));
    let given_up = lab.a.drop_count("conntrack_early_drop") - before;
    let r = rows(&lab.a);
    let after = connects(&outside, NODE_A, TCP_NP, 20);
    let pods = connects(&lab.client.netns, VIP, 80, 5);
    let drops = lab.a.inspect("counters")["drops"].clone();
    eprintln!(
        "remote backend: {n} SYNs in {took:?}; client {during}% during; {given_up} given up; rows {} \
         (outside tcp {:?}); after: client {after}/20, pods {pods}/5\n drops {drops}",
        r.len(),
        outside_count(&lab.a, "tcp")
    );
    assert_eq!(during, 100, "client refused during the flood");
    assert_eq!(after, 20, "client refused after the flood (source NAT ports not freed?)");
    assert_eq!(pods, 5);
    assert!(r.len() <= limit as usize * 2 + 64, "{} rows tracked", r.len());
}

/// One slow client: connect (its pure ACKs are dropped on its own host, so
/// at the node the connection stays unanswered), wait `delay`, then send a
/// request (its data segment carries the ACK that answers at the node):
/// whether the answer comes.
fn slow_client(ns: &Netns, delay: Duration) -> bool {
    in_netns(&ns.path(), move || {
        let Ok(mut c) = TcpStream::connect_timeout(&(NODE_A, TCP_NP).into(), Duration::from_secs(3)) else {
            return false;
        };
        std::thread::sleep(delay);
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        if writeln!(c, "who").is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(c).read_line(&mut line).is_ok() && !line.is_empty()
    })
    .join()
    .unwrap()
}

/// Clients whose handshake takes long at the node (a far client, a lossy
/// link: emulated by dropping the client's pure ACKs on its host, so its
/// first data segment answers the connection after `delay`), connecting
/// while a sustained SYN flood runs (8 s, from 5x TCP's share of faked sources).
/// The flood gives the client's connection up if it sends TCP's share
/// within `delay`. Measures the flood's rate and the clients' success at
/// 50 ms, 200 ms and 1 s. (docs/why-dropped.md row 34 says to raise
/// `conntrack_max_outside` only when clients take longer than the flood
/// needs to send TCP's share.) No netem in this kernel: hence the ACK drop.
/// Finding F2 (medium): at 48-65k SYN/s from one host TCP's share passes
/// in 125-170 ms; a client whose handshake takes 200 ms at the node was
/// served 6/21, 1 s: 1/6 (50 ms: 21/21). With one backend it goes
/// unnoticed (the given-up connection is picked up mid-stream by the same
/// backend); with three, 2 in 3 land elsewhere and are reset.
/// Mitigated (stop 32): backend and first source-NAT port are chosen by
/// the flow's hash, so a pickup lands where the connection was. At 145k
/// SYN/s (TCP's share in 56 ms), two runs: 50 ms 41/43, 200 ms 17/19,
/// 1 s 5/7 (the build before, same rate: 17/54, 4/23, 1/6). Left: a
/// remote backend's port taken by the flood meanwhile (a new port: reset).
#[test]
#[ignore = "round 31, F2 (medium, mitigated): during a 145k SYN/s flood ~1 in 10 slow clients is still reset"]
fn clients_behind_latency_during_a_syn_flood() {
    require_root!();
    // Three backends (Cluster): a connection given up and picked up again
    // mid-stream would most likely land on another backend (an RST).
    let lab = outside_lab("native", "", |lab| np_service(&lab.backend_ips(), "Cluster"));
    wait_served(&lab.a, NODE_A, TCP_NP, &lab.backend_ips());
    let outside = outside_host("rt31-l", OUTSIDE);
    let attacker = outside_host("rt31-f", ATTACKER);
    outside.exec(&["nft", "add", "table", "ip", "rt31"]);
    outside.exec(&["nft", "add", "chain", "ip", "rt31", "out", "{ type filter hook output priority 0 ; }"]);
    outside.exec(&[
        "nft",
        "add",
        "rule",
        "ip",
        "rt31",
        "out",
        "tcp",
        "dport",
        &TCP_NP.to_string(),
        "ip",
        "length",
        "40-64",
        "tcp",
        "flags",
        "&",
        "(fin|syn|rst|psh|ack)",
        "==",
        "ack",
        "drop",
    ]);
    let (_, limit) = outside_count(&lab.a, "tcp");
    let mut results = Vec::new();
    let mut base = 0usize;
    for delay_ms in [50u64, 200, 1000] {
        let delay = Duration::from_millis(delay_ms);
        assert!(slow_client(&outside, delay), "control at {delay_ms} ms");
        let n = 5 * limit as usize;
        // Faked sources on the segment (10.250.0.100-.222: past the
        // reverse-path check), fresh ones each round.
        let packets = syns(100, base..base + n);
        base += n;
        let early_before = lab.a.drop_count("conntrack_early_drop");
        let frames = frames_from(&attacker, &lab.a, packets);
        let (served, tried, took) = std::thread::scope(|scope| {
            // The same 5x share of sources over and over for 8 s (each
            // given up long before its tuple comes round again).
            let flood = scope.spawn(|| {
                let t = Instant::now();
                let mut sent = 0;
                while t.elapsed() < Duration::from_secs(8) {
                    send_raw_frames(&attacker, "eth0", frames.clone()).unwrap();
                    sent += frames.len();
                }
                (t.elapsed(), sent)
            });
            std::thread::sleep(Duration::from_millis(300));
            let (mut served, mut tried) = (0, 0);
            while !flood.is_finished() {
                tried += 1;
                served += usize::from(slow_client(&outside, delay));
            }
            (served, tried, flood.join().unwrap())
        });
        let (took, n) = took;
        let rate = n as f64 / took.as_secs_f64();
        let share_in = Duration::from_secs_f64(limit as f64 / rate);
        eprintln!(
            "delay {delay_ms} ms: flood {n} SYNs in {took:?} ({rate:.0}/s: TCP's share {limit} in {share_in:?}); \
             slow client {served}/{tried}; early drops +{}",
            lab.a.drop_count("conntrack_early_drop") - early_before
        );
        results.push((delay_ms, served, tried, share_in));
    }
    for (delay_ms, served, tried, share_in) in results {
        assert!(
            served * 10 >= tried * 9,
            "{delay_ms} ms client served {served}/{tried} during a flood sending TCP's share in {share_in:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 2. CNI DEL forgetting the pod's connections
// ---------------------------------------------------------------------------

fn client_rows(node: &Node, ip: Ipv4Addr) -> Vec<serde_json::Value> {
    rows(node).into_iter().filter(|r| r["client_ip"] == ip.to_string()).collect()
}

fn ask_on(conn: &mut TcpStream) -> bool {
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if writeln!(conn, "who").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(conn.try_clone().unwrap()).read_line(&mut line).is_ok() && !line.is_empty()
}

/// The address of a deleted pod reused by a new pod, which opens a
/// long-lived Service connection and 20 unanswered ones (limit 32); then
/// DELs a racing runtime might send: the old pod's DEL again (late, its
/// netns gone), a DEL for an unknown container whose prevResult names the
/// new pod's address, and a DEL with no prevResult for the old container.
/// What should hold: the new pod's connection still answers, its tracked
/// rows stay, its count holds (20 more unanswered: at most 12 tracked).
#[test]
fn late_and_forged_dels_leave_the_new_owners_connections() {
    require_root!();
    let mut lab = lab("native");
    let a2 = lab.backends[0].ip;
    let config = format!(
        "conntrack_max_per_client = 32\n{}\n[[services]]\nname = \"dead\"\ncluster_ip = \"{DEAD_VIP}\"\n\
         backends = [\"10.244.2.250\"]\n[[services.ports]]\nport = 80\ntarget_port = 8080\n",
        np_service(&[a2], "Cluster")
    );
    lab.a.set_extra_config(&config);
    lab.a.stop_agent();
    lab.a.start_agent();
    wait_served(&lab.a, VIP, 80, &[a2]);
    let old = lab.a.add_pod("y1");
    let old_result = old.result.clone();
    let old_id = old.container_id.clone();
    let old_ip = old.ip;
    let old_path = old.netns.path().display().to_string();
    let del = lab.a.del_pod(&old);
    assert!(del.success, "{}", del.raw_stdout);
    drop(old);
    let prev = Ipv4Addr::from(u32::from(old_ip) - 1);
    let dir = lab.a.work_dir.join("ipam/datapath-test");
    for e in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with("last_reserved_ip") {
            std::fs::write(e.path(), prev.to_string()).unwrap();
        }
    }
    let new = lab.a.add_pod("y2");
    assert_eq!(new.ip, old_ip, "test setup: address reused");
    let path = new.netns.path();
    let mut conn = in_netns(&path, || TcpStream::connect_timeout(&(VIP, 80).into(), Duration::from_secs(3)))
        .join()
        .unwrap()
        .expect("long-lived connection");
    assert!(ask_on(&mut conn));
    let unanswered = |n: usize| {
        in_netns(&path, move || {
            for _ in 0..n {
                let _ = TcpStream::connect_timeout(&(DEAD_VIP, 80).into(), Duration::from_millis(20));
            }
        })
        .join()
        .unwrap()
    };
    unanswered(20);
    let before = client_rows(&lab.a, new.ip).len();
    let mut problems = Vec::new();
    let conf = lab.a.cni_config();
    let mut forged_result = old_result.clone();
    forged_result["interfaces"][0]["name"] = "dptnope0".into();
    let cases: Vec<(&str, String, Option<serde_json::Value>)> = vec![
        ("late DEL of the old pod", old_id.clone(), Some(old_result.clone())),
        ("late DEL, no prevResult", old_id.clone(), None),
        (
            "DEL of an unknown container naming the address",
            "rt31-unknown-container".into(),
            Some(forged_result),
        ),
    ];
    for (name, id, prev) in cases {
        let mut c = conf.clone();
        if let Some(p) = prev {
            c["prevResult"] = p;
        }
        let run = lab.a.cni(&Node::cni_env("DEL", &id, &old_path), c.to_string().as_bytes());
        std::thread::sleep(Duration::from_millis(200));
        let rows_now = client_rows(&lab.a, new.ip).len();
        let alive = ask_on(&mut conn);
        let served = connects(&new.netns, VIP, 80, 2);
        eprintln!(
            "{name}: exit ok {} {:?}; new pod's rows {before} -> {rows_now}; long-lived answers {alive}; \
             new connections {served}/2",
            run.success,
            run.raw_stdout.trim()
        );
        if !alive || rows_now + 2 < before {
            problems.push(format!("{name}: rows {before} -> {rows_now}, alive {alive}"));
        }
    }
    // The count: 20 more unanswered; at most 12 more should be tracked.
    let dead_before = client_rows(&lab.a, new.ip)
        .iter()
        .filter(|r| r["service_ip"] == DEAD_VIP.to_string() || r.to_string().contains(&DEAD_VIP.to_string()))
        .count();
    unanswered(20);
    let dead_after =
        client_rows(&lab.a, new.ip).iter().filter(|r| r.to_string().contains(&DEAD_VIP.to_string())).count();
    eprintln!(
        "dead-VIP rows of the new pod {dead_before} -> {dead_after} (limit 32); client_limit drops {}",
        lab.a.drop_count("conntrack_client_limit")
    );
    if dead_after > 33 {
        problems.push(format!("count reset: {dead_after} unanswered tracked past a limit of 32"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------
// 3. Day-2 operations
// ---------------------------------------------------------------------------

/// (what, the agent's arguments, its environment).
type FatalCase<'a> = (&'a str, Vec<String>, Vec<(&'a str, &'a str)>);

fn non_json_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).map_or(true, |v| {
                !(v.is_object()
                    && v["level"].is_string()
                    && v["message"].is_string()
                    && v["timestamp"].is_string())
            })
        })
        .map(|l| l.chars().take(200).collect())
        .collect()
}

/// `--log-format json`: every line the agent writes to stderr is one JSON
/// object (timestamp, level, message), through start, CNI ADD/DEL (the
/// agent's CNI-called paths, including a failing ADD), a bad config
/// reload, a stop; a fatal error (no config, bad config, bpffs busy) is a
/// JSON line with `datapath-agent failed`, by flag and by
/// `DATAPATH_LOG_FORMAT`; so are the CLI's own failures.
#[test]
fn json_logs_are_json_on_every_path() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", NODE_A);
    node.agent_options = vec!["--log-format".into(), "json".into()];
    node.start_agent();
    let pod = node.add_pod("j1");
    // A failing ADD (netns gone).
    let bad = node.cni(
        &Node::cni_env("ADD", "rt31-nonetns", "/var/run/netns/rt31-none"),
        node.cni_config().to_string().as_bytes(),
    );
    let _ = node.del_pod(&pod);
    let _ = http_get_local_with(&node.netns, 9976, "/metrics", &[]);
    std::fs::write(node.config_path(), "this is = = not toml").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    node.stop_agent();
    let log = node.agent_log();
    let mut problems: Vec<String> = non_json_lines(&log).into_iter().map(|l| format!("run: {l}")).collect();
    eprintln!(
        "run: {} lines, failing ADD ok={} ; {} not JSON",
        log.lines().count(),
        bad.success,
        problems.len()
    );
    let agent = bin_dir().join("datapath-agent");
    let fatal_cases: Vec<FatalCase> = vec![
        (
            "flag, no config",
            vec![
                "--log-format".into(),
                "json".into(),
                "run".into(),
                "--config".into(),
                "/nonexistent/rt31.toml".into(),
            ],
            vec![],
        ),
        (
            "env, no config",
            vec!["run".into(), "--config".into(), "/nonexistent/rt31.toml".into()],
            vec![("DATAPATH_LOG_FORMAT", "json")],
        ),
        (
            "flag after subcommand",
            vec![
                "run".into(),
                "--log-format".into(),
                "json".into(),
                "--config".into(),
                "/nonexistent/rt31.toml".into(),
            ],
            vec![],
        ),
        (
            "env, bad config",
            vec!["run".into(), "--config".into(), node.config_path().display().to_string()],
            vec![("DATAPATH_LOG_FORMAT", "json")],
        ),
        (
            "env, inspect bad bpffs",
            vec!["inspect".into(), "config".into(), "--bpffs-dir".into(), "/nonexistent".into()],
            vec![("DATAPATH_LOG_FORMAT", "json")],
        ),
        (
            "env, status bad config",
            vec!["status".into(), "--config".into(), "/nonexistent/rt31.toml".into()],
            vec![("DATAPATH_LOG_FORMAT", "json")],
        ),
    ];
    for (name, args, env) in fatal_cases {
        let mut cmd = Command::new(&agent);
        cmd.args(&args).env_remove("DATAPATH_LOG_FORMAT").env_remove("RUST_LOG");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let bad = non_json_lines(&stderr);
        eprintln!("{name}: exit {:?}; stderr {:?}", out.status.code(), &stderr[..stderr.len().min(300)]);
        if !bad.is_empty() || stderr.trim().is_empty() {
            problems.push(format!("{name}: not JSON: {bad:?} (stderr {stderr:?})"));
        }
    }
    for (what, value) in [("uppercase", "JSON"), ("unknown", "yaml")] {
        let out = Command::new(&agent)
            .args(["run", "--config", "/nonexistent/rt31.toml"])
            .env("DATAPATH_LOG_FORMAT", value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!(
            "DATAPATH_LOG_FORMAT={value} ({what}): exit {:?} stderr {:?}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).chars().take(300).collect::<String>()
        );
    }
    for p in &problems {
        eprintln!("PROBLEM {p}");
    }
    assert!(problems.is_empty(), "{} problems", problems.len());
}

fn metric_value(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Kubernetes mode: a Node with no conditions at all and the patch refused
/// four times (500): the condition is added, False; then someone sets it
/// True again (a route controller, an operator): is it cleared again? And
/// watch errors on `/metrics` (services list failing 3 times), the
/// `process_*` series, `promtool check metrics` throughout.
#[test]
fn node_condition_without_conditions_and_refused_patches() {
    require_root!();
    node_condition(false);
}

/// After the agent cleared it, someone (a route controller, an operator,
/// a node problem detector) sets `NetworkUnavailable` True again while the
/// datapath is still up: the scheduler keeps pods off the node until the
/// agent restarts (measured: still True 20 s later, no PATCH sent).
#[test]
#[ignore = "round 31, F3 (low): NetworkUnavailable set back to True is never cleared again while the agent runs"]
fn node_condition_set_back_to_true_is_cleared_again() {
    require_root!();
    node_condition(true);
}

fn node_condition(set_back: bool) {
    let fabric = Fabric::new();
    sh(&["ip", "-n", &fabric.netns.name, "addr", "add", &format!("{API_IP}/24"), "dev", "dptbr0"]);
    let api = FakeApiServer::start(&fabric.netns, API_IP);
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", NODE_A, "native");
    let mut node = node_object(&a.id, Some("10.244.1.0/24"), "10.250.0.1");
    if let Some(status) = node["status"].as_object_mut() {
        status.remove("conditions");
    }
    eprintln!("node object: {node}");
    api.apply(node.clone());
    let kubeconfig = api.kubeconfig(&a.work_dir);
    a.use_kubernetes(&kubeconfig);
    let status_path = format!("/api/v1/nodes/{}/status", a.id);
    api.fail_next(&status_path, 4);
    let t0 = Instant::now();
    a.start_agent();
    let condition = || {
        api.object("Node", &a.id).and_then(|n| {
            n["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "NetworkUnavailable").cloned())
        })
    };
    let mut problems = Vec::new();
    let scrape = |what: &str, problems: &mut Vec<String>| -> String {
        match http_get_local_with(&a.netns, 9976, "/metrics", &[]) {
            Ok((200, _, body)) => {
                if let Err(e) = promtool_check(&body) {
                    problems.push(format!("promtool at {what}: {e}"));
                }
                body
            }
            other => {
                eprintln!("scrape at {what}: {:?}", other.map(|r| r.0));
                String::new()
            }
        }
    };
    scrape("start", &mut problems);
    wait_for("NetworkUnavailable False", Duration::from_secs(40), || {
        condition().is_some_and(|c| c["status"] == "False")
    });
    eprintln!("no conditions, 4 refusals: False after {:?}: {:?}", t0.elapsed(), condition());
    scrape("cleared", &mut problems);
    // Watch errors.
    api.fail_next_lists("/api/v1/services", 3);
    api.disconnect_watches();
    std::thread::sleep(Duration::from_secs(8));
    let body = scrape("after watch errors", &mut problems);
    let watch: Vec<&str> =
        body.lines().filter(|l| l.starts_with("pod_datapath_kubernetes_watch_errors_total")).collect();
    let process: Vec<&str> = body.lines().filter(|l| l.starts_with("process_")).collect();
    eprintln!("watch errors: {watch:?}\nprocess: {process:?}");
    let services_errors =
        metric_value(&body, "pod_datapath_kubernetes_watch_errors_total{watch=\"Service\"}");
    if services_errors.unwrap_or(0.0) < 1.0 {
        problems.push(format!("services watch errors not counted: {watch:?}"));
    }
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
    ] {
        if !body.lines().any(|l| l.starts_with(name)) {
            problems.push(format!("no {name}"));
        }
    }
    if !set_back {
        for p in &problems {
            eprintln!("PROBLEM {p}");
        }
        assert!(problems.is_empty(), "{problems:#?}");
        return;
    }
    // Set back to True by someone else.
    let mut now = api.object("Node", &a.id).unwrap();
    let conds = now["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let mut conds: Vec<serde_json::Value> =
        conds.into_iter().filter(|c| c["type"] != "NetworkUnavailable").collect();
    conds.push(serde_json::json!({ "type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated", "message": "set back" }));
    now["status"]["conditions"] = conds.into();
    api.apply(now);
    let t1 = Instant::now();
    let mut cleared_again = None;
    while t1.elapsed() < Duration::from_secs(20) {
        if condition().is_some_and(|c| c["status"] == "False") {
            cleared_again = Some(t1.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("set back to True: cleared again after {cleared_again:?}; now {:?}", condition());
    scrape("end", &mut problems);
    let patches = api.requests().iter().filter(|r| r.starts_with("PATCH ")).count();
    eprintln!(
        "PATCH requests {patches}; log tail:\n{}",
        a.agent_log().lines().rev().take(8).collect::<Vec<_>>().join("\n")
    );
    if cleared_again.is_none() {
        problems.push(
            "the condition set back to True stays True (node unschedulable until the agent restarts)".into(),
        );
    }
    for p in &problems {
        eprintln!("PROBLEM {p}");
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// `deploy/grafana-dashboard.json` as Grafana would import it: valid JSON,
/// a `panels` list with unique ids, every target's expression non-empty,
/// no `rate()` over a gauge (`pod_datapath_map_entries`, `process_open_fds`,
/// ...) and no raw counter (`_total`) graphed without a rate/increase, and
/// a datasource input or variable for the Prometheus data source.
#[test]
fn grafana_dashboard_imports_and_its_queries_are_sensible() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana-dashboard.json"))
            .unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let mut problems = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut panels = Vec::new();
    fn walk(p: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        for panel in p["panels"].as_array().into_iter().flatten() {
            out.push(panel.clone());
            walk(panel, out);
        }
    }
    walk(&dash, &mut panels);
    let mut exprs = 0;
    for p in &panels {
        if let Some(id) = p["id"].as_u64()
            && !ids.insert(id)
        {
            problems.push(format!("duplicate panel id {id}"));
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap_or("");
            exprs += 1;
            if e.trim().is_empty() {
                problems.push(format!("panel {:?}: empty expr", p["title"]));
            }
            for gauge in ["pod_datapath_map_entries", "process_open_fds", "process_resident_memory_bytes"] {
                if e.contains(&format!("rate({gauge}")) || e.contains(&format!("increase({gauge}")) {
                    problems.push(format!("panel {:?}: rate over gauge: {e}", p["title"]));
                }
            }
            // A counter named *_total outside any rate/increase/resets.
            for (i, _) in e.match_indices("_total") {
                let before = &e[..i];
                let in_fn = ["rate(", "increase(", "irate(", "resets(", "changes("]
                    .iter()
                    .any(|f| before.rfind(f).is_some_and(|at| !before[at..].contains(')')));
                if !in_fn {
                    problems.push(format!("panel {:?}: raw counter: {e}", p["title"]));
                }
            }
        }
    }
    let has_ds = dash["__inputs"].as_array().is_some_and(|i| !i.is_empty())
        || dash["templating"]["list"].as_array().is_some_and(|l| l.iter().any(|v| v["type"] == "datasource"));
    eprintln!(
        "{} panels, {exprs} queries, datasource input/variable {has_ds}, schemaVersion {}",
        panels.len(),
        dash["schemaVersion"]
    );
    if !has_ds {
        problems.push("no datasource input or variable".into());
    }
    for p in &problems {
        eprintln!("PROBLEM {p}");
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Blind handshake completion: SYNs from faked sources, each followed by
/// the "client's" ACK (or data, or a FIN) sent blind, with an
/// acknowledgement number that is not the backend's ISN + 1 (the attacker
/// never saw the SYN-ACK). If the programs took those as answered, the
/// faked connections would neither count against TCP's share nor be
/// early-dropped, and would hold the table past the outside share (pods
/// refused, `conntrack_full`). Table 2048 entries (TCP's share 128); 3,000
/// faked connections per kind. What should hold: the faked connections
/// stay unanswered (count at most the share, rows from the flood at most
/// the share; the backend's RST to the bad ACK makes them `closing`, still
/// counted), pods served 20/20, an outside client 5/5.
#[test]
fn blind_acks_do_not_answer_faked_connections() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt31-b", OUTSIDE);
    let attacker = outside_host("rt31-a", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let (_, limit) = outside_count(&lab.a, "tcp");
    let node = NODE_A.octets();
    let mut problems = Vec::new();
    for (k, (name, flags, payload)) in [
        ("ACK", 0x10u8, &b""[..]),
        ("PSH|ACK with data", 0x18, &b"GET / HTTP/1.0\r\n\r\n"[..]),
        ("FIN|ACK", 0x11, &b""[..]),
    ]
    .into_iter()
    .enumerate()
    {
        let base = 100 + 10 * k as u8;
        let mut packets = Vec::new();
        for i in 0..3000 {
            let (s, p) = faked_from(base, i);
            packets.push(Ipv4::tcp(s, p, node, TCP_NP, TCP_SYN, &[]));
            packets.push(Ipv4::tcp(s, p, node, TCP_NP, flags, payload));
        }
        let full_before = lab.a.drop_count("conntrack_full");
        send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let r = rows(&lab.a);
        let prefix = format!("10.250.0.{}", base / 10);
        let flood: Vec<&serde_json::Value> = r
            .iter()
            .filter(|c| {
                let ip: Ipv4Addr = c["client_ip"].as_str().unwrap_or("0.0.0.0").parse().unwrap();
                ip.octets()[3] >= base && ip.octets()[3] < base + 3
            })
            .collect();
        let mut states = std::collections::BTreeMap::new();
        for c in &flood {
            *states.entry(c["state"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
        }
        let tcp = outside_count(&lab.a, "tcp");
        let pods = connects(&lab.client.netns, VIP, 80, 20);
        let out = connects(&outside, NODE_A, TCP_NP, 5);
        let full = lab.a.drop_count("conntrack_full") - full_before;
        eprintln!(
            "{name}: rows from the flood {} {states:?} (all rows {}), outside tcp {tcp:?}, pods {pods}/20, \
             outside {out}/5, conntrack_full +{full} ({prefix})",
            flood.len(),
            r.len()
        );
        let answered = states
            .iter()
            .filter(|(s, _)| s.as_str() != "opening" && s.as_str() != "closing")
            .map(|(_, n)| n)
            .sum::<i32>();
        if pods != 20 || out != 5 || flood.len() as i64 > limit + 16 || answered > 16 {
            problems
                .push(format!("{name}: {} rows {states:?}, pods {pods}/20, outside {out}/5", flood.len()));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Lone ACKs (and data) from faked sources, no SYN: do they open Service
/// connections (mid-stream pickup), held to TCP's share? Table 2048.
#[test]
fn lone_acks_from_faked_sources_open_nothing_past_the_share() {
    require_root!();
    let lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt31-m", OUTSIDE);
    let attacker = outside_host("rt31-n", ATTACKER);
    let node = NODE_A.octets();
    let packets: Vec<Ipv4> = (0..3000)
        .map(|i| {
            let (s, p) = faked_from(100, i);
            Ipv4::tcp(
                s,
                p,
                node,
                TCP_NP,
                if i % 2 == 0 { 0x10 } else { 0x18 },
                if i % 2 == 0 { b"" } else { b"x\n" },
            )
        })
        .collect();
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, packets)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let r = rows(&lab.a);
    let flood =
        r.iter().filter(|c| c["client_ip"].as_str().is_some_and(|ip| ip.starts_with("10.250.0.10"))).count();
    let pods = connects(&lab.client.netns, VIP, 80, 20);
    let out = connects(&outside, NODE_A, TCP_NP, 5);
    eprintln!(
        "3000 lone ACKs: rows from them {flood}, outside tcp {:?}, pods {pods}/20, outside {out}/5",
        outside_count(&lab.a, "tcp")
    );
    assert!(flood <= 128 + 16 && pods == 20 && out == 5);
}

/// A careless operator's `conntrack_max_outside`: 1 and 3 (odd: how is it
/// split? a TCP half of 0 would refuse every outside TCP client), and
/// past the documented cap (`conntrack_max_entries / 4`). What should
/// hold: the agent refuses the value with a message, or runs with a TCP
/// share of at least 1 that serves an outside client, and never past the
/// cap.
#[test]
fn odd_and_oversized_outside_limits_are_refused_or_serve_clients() {
    require_root!();
    let mut lab = outside_lab("native", "conntrack_max_entries = 2048\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt31-o", OUTSIDE);
    let services = np_service(&[a2], "Local");
    let mut problems = Vec::new();
    for v in [1u32, 2, 3, 4096] {
        lab.a.stop_agent();
        lab.a.set_extra_config(&format!(
            "serve_outside_clients = true\nconntrack_max_entries = 2048\nconntrack_max_outside = {v}\n{services}"
        ));
        lab.a.launch_agent(None);
        std::thread::sleep(Duration::from_secs(3));
        if !lab.a.agent_running() {
            let log = lab.a.agent_log();
            let said: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("panicked") || l.contains("error"))
                .take(3)
                .collect();
            eprintln!("conntrack_max_outside = {v}: refused: {said:?} ({} log lines)", log.lines().count());
            if log.contains("panicked") {
                problems.push(format!("{v}: the agent panicked instead of refusing: {said:?}"));
            }
            lab.a.stop_agent();
            continue;
        }
        lab.a.wait_for_agent_socket();
        wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
        let tcp = outside_count(&lab.a, "tcp");
        let udp = outside_count(&lab.a, "udp");
        let served = connects(&outside, NODE_A, TCP_NP, 3);
        eprintln!("conntrack_max_outside = {v}: tcp {tcp:?} udp {udp:?}; outside client {served}/3");
        if served != 3 {
            problems.push(format!("{v}: client {served}/3 (tcp share {tcp:?})"));
        }
        if tcp.1 + udp.1 > 512 {
            problems.push(format!("{v}: past the cap of 512: {tcp:?} {udp:?}"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// No handshakes at all: one share's worth of SYNs from faked sources
/// (exactly TCP's share: nothing given up), left to expire (the opening
/// timer), then another share's worth from other faked sources. What
/// should hold: a new client is served at once.
/// Finding F1, cheapest form (high, fixed): against the queue early drop
/// first had, batch 1 of 8,192 faked SYNs expired after ~99 s, batch 2 of
/// 8,192: outside TCP clients refused 0/5, served again after 64.5 s (34
/// `conntrack_outside_limit` drops, 0 early drops): the expired keys
/// headed the queue and no new SYN walked past them. The ring has no head.
#[test]
fn expired_fakes_at_the_queue_head_lock_clients_out_again() {
    require_root!();
    // A short opening timer: batch 1 expires within seconds (at the default
    // 60 s the finding was the same, at ten times the test's length).
    let lab = outside_lab("native", "conntrack_opening_seconds = 5\n", |lab| {
        np_service(&[lab.backends[0].ip], "Local")
    });
    let a2 = lab.backends[0].ip;
    wait_served(&lab.a, NODE_A, TCP_NP, &[a2]);
    let outside = outside_host("rt31-e", OUTSIDE);
    let attacker = outside_host("rt31-g", ATTACKER);
    assert_eq!(connects(&outside, NODE_A, TCP_NP, 3), 3, "control");
    let (count, limit) = outside_count(&lab.a, "tcp");
    let first = (limit - count.max(0)) as usize;
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, syns(100, 0..first))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    eprintln!("batch 1: {first} SYNs; outside tcp {:?}", outside_count(&lab.a, "tcp"));
    let t = Instant::now();
    while outside_count(&lab.a, "tcp").0 > 0 && t.elapsed() < Duration::from_secs(100) {
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("batch 1 expired after {:?}; outside tcp {:?}", t.elapsed(), outside_count(&lab.a, "tcp"));
    let (count, _) = outside_count(&lab.a, "tcp");
    let second = (limit - count.max(0)) as usize;
    // Other sources (10.250.0.140..): new tuples.
    send_raw_frames(&attacker, "eth0", frames_from(&attacker, &lab.a, syns(140, 0..second))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    eprintln!("batch 2: {second} SYNs; outside tcp {:?}", outside_count(&lab.a, "tcp"));
    let (served, served_after) = lockout(&lab.a, &outside, t0, Duration::from_secs(90));
    assert_eq!(
        served, 5,
        "two batches of {limit} SYNs a minute apart locked clients out for {served_after:?}"
    );
}
