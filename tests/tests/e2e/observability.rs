//! Drops provoked from a pod show up, with their reason, identically in
//! `inspect counters`, in Prometheus `/metrics` and in bpftool; `inspect`
//! shows the live state.

use std::{net::Ipv4Addr, time::Duration};

use datapath_tests::{
    lab::{
        Node, http_get_local, http_get_local_with, malformed_frames, ping, ping_from_spoofed_address,
        send_raw_frames,
    },
    require_root, sh, wait_for,
};

/// The sum of `name{...label="value"...} N` over all samples carrying
/// `label` (e.g. one reason over all directions) in an OpenMetrics body.
fn sample(metrics: &str, name: &str, label: &str) -> Option<u64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None => ("", rest),
            };
            let wanted = label.is_empty() || labels.split(',').any(|l| l == label);
            wanted.then(|| value.trim().parse::<u64>().ok()).flatten()
        })
        .reduce(|a, b| a + b)
}

#[test]
fn provoked_drops_agree_in_inspect_metrics_and_bpftool() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    // Resolve the gateway with the real address first: a pod that must ARP
    // while using a spoofed source also sends spoofed ARP (counted too).
    assert!(datapath_tests::lab::ping(&a.netns, b.ip, 1));
    let baseline = node.inspect("counters");
    assert!(baseline["drops"].as_object().unwrap().values().all(|n| n == 0), "{baseline}");
    let monitor = node.monitor(&["--count", "8", "--seconds", "20"]);

    // spoofed_source x3, ttl_exceeded x2, and one each of malformed_ipv4,
    // vlan_tagged, spoofed_arp from raw frames.
    assert!(!ping_from_spoofed_address(&a, "10.244.1.250", b.ip, 3));
    assert!(!a.netns.exec_ok(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "-t", "1", &b.ip.to_string()]));
    send_raw_frames(&a.netns, "eth0", malformed_frames(&node, &a, &b)).unwrap();
    let dropped = |counters: &serde_json::Value| -> u64 {
        counters["drops"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum()
    };
    wait_for("the eight drops counted", Duration::from_secs(5), || dropped(&node.inspect("counters")) >= 8);

    let (events, summary) = monitor.finish();
    let counters = node.inspect("counters");
    let expected = [
        ("spoofed_source", 3),
        ("ttl_exceeded", 2),
        ("malformed_ipv4", 1),
        ("vlan_tagged", 1),
        ("spoofed_arp", 1),
    ];
    for (reason, n) in expected {
        assert_eq!(counters["drops"][reason].as_u64(), Some(n), "{reason}: {counters}");
    }
    for (reason, n) in counters["drops"].as_object().unwrap() {
        if !expected.iter().any(|(r, _)| r == reason) {
            assert_eq!(n.as_u64(), Some(0), "nothing else dropped: {reason}");
        }
    }

    // The monitor saw each drop, with its reason and the packet's addresses.
    for (reason, n) in expected {
        let seen = events.iter().filter(|e| e["reason"] == reason).count() as u64;
        assert_eq!(seen, n, "monitor events for {reason}: {events:#?}\n{summary}");
    }
    let spoofed = events.iter().find(|e| e["reason"] == "spoofed_source").unwrap();
    assert_eq!(spoofed["verdict"], "dropped");
    assert_eq!(spoofed["direction"], "from_pod");
    assert_eq!(spoofed["interface"], a.host_veth.as_str());
    assert_eq!(spoofed["protocol"], "icmp");
    assert_eq!(spoofed["source"], "10.244.1.250");
    assert_eq!(spoofed["destination"], b.ip.to_string());
    assert!(summary.contains("8 events shown") && summary.contains("0 rate limited"), "{summary}");
    assert_eq!(counters["monitor_events"]["emitted"].as_u64(), Some(8), "{counters}");
    assert_eq!(counters["drops_by_direction"]["from_pod"]["spoofed_source"].as_u64(), Some(3));

    let (status, metrics) = http_get_local(&node.netns, 9976, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    for (reason, n) in counters["drops"].as_object().unwrap() {
        assert_eq!(
            sample(&metrics, "pod_datapath_drops_total", &format!("reason=\"{reason}\"")),
            n.as_u64(),
            "/metrics agrees with inspect on {reason}:\n{metrics}"
        );
        assert_eq!(
            sample(&metrics, "pod_datapath_drop_bytes_total", &format!("reason=\"{reason}\"")),
            counters["drop_bytes"][reason].as_u64(),
            "/metrics agrees with inspect on {reason}'s bytes:\n{metrics}"
        );
    }
    // Bytes are the frames as they came: three 98-byte pings.
    assert_eq!(counters["drop_bytes"]["spoofed_source"].as_u64(), Some(3 * 98), "{counters}");
    assert!(sample(&metrics, "pod_datapath_forward_bytes_total", "path=\"local_delivery\"").unwrap() > 0);
    // Forwards keep moving (the node's own neighbour probes into the pods
    // count as routed_into_pod), so /metrics must lie between two readings
    // of inspect taken around it.
    let after = node.inspect("counters");
    for (path, n) in counters["forwards"].as_object().unwrap() {
        let seen = sample(&metrics, "pod_datapath_forwards_total", &format!("path=\"{path}\"")).unwrap();
        let later = after["forwards"][path].as_u64().unwrap();
        assert!(
            n.as_u64().unwrap() <= seen && seen <= later,
            "{path}: inspect {n}, /metrics {seen}, inspect {later}"
        );
    }
    assert_eq!(sample(&metrics, "pod_datapath_endpoints", ""), Some(2), "{metrics}");
    assert_eq!(
        sample(&metrics, "pod_datapath_drops_total", "direction=\"from_pod\""),
        Some(8),
        "all from the pod:\n{metrics}"
    );
    assert_eq!(sample(&metrics, "pod_datapath_monitor_events_total", "outcome=\"emitted\""), Some(8));
    assert_eq!(sample(&metrics, "pod_datapath_map_capacity", "map=\"endpoints\""), Some(65536));

    // bpftool (Debian's) sees the same per-CPU counter for spoofed_source.
    let dump = sh(&[
        "bpftool",
        "-j",
        "map",
        "lookup",
        "pinned",
        &node.bpffs_dir.join("maps/drop_counters-v2").display().to_string(),
        "key",
        "1",
        "0",
        "0",
        "0",
    ]);
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    // With -j, bpftool prints raw bytes under "values" and the BTF view under "formatted".
    let total = |field: &str| -> u64 {
        v["formatted"]["values"].as_array().unwrap().iter().map(|c| c["value"][field].as_u64().unwrap()).sum()
    };
    assert_eq!(total("packets"), 3, "{dump}");
    // Bytes next to packets: three pings, 98-byte frames.
    assert_eq!(total("bytes"), 3 * 98, "{dump}");

    // inspect config shows what the programs run with.
    let config = node.inspect("config");
    assert_eq!(config["mode"], "native", "{config}");
    assert_eq!(config["node_ip"], "10.250.0.1");
    assert_eq!(config["uplink"], "dptup0");

    // Per-pod traffic: a sent all of the above (8 drops and the good ping).
    let endpoints = node.inspect("endpoints");
    let of =
        |ip: Ipv4Addr| endpoints.as_array().unwrap().iter().find(|e| e["pod_ip"] == ip.to_string()).cloned();
    let a_row = of(a.ip).unwrap();
    assert!(a_row["sent_packets"].as_u64().unwrap() >= 9, "{a_row}");
    assert!(of(b.ip).unwrap()["delivered_packets"].as_u64().unwrap() >= 1);

    // Pods come and go: inspect endpoints and the gauge follow.
    let c = node.add_pod("c");
    assert!(node.del_pod(&a).success);
    let endpoints = node.inspect("endpoints");
    let mut ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    ips.sort();
    let mut want = vec![b.ip.to_string(), c.ip.to_string()];
    want.sort();
    assert_eq!(ips, want);
    let (_, metrics) = http_get_local(&node.netns, 9976, "/metrics");
    assert_eq!(sample(&metrics, "pod_datapath_endpoints", ""), Some(2));
}

#[test]
fn monitor_traces_forwards_within_its_rate_limit() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.set_extra_config("monitor_events_per_second = 50\n");
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(datapath_tests::lab::ping(&a.netns, b.ip, 1));

    // A flood of ~1,000 forwarding decisions per second against 50 events
    // per second per CPU: the monitor sees a bounded sample, the rest is counted.
    let monitor = node.monitor(&["--forwards", "--seconds", "2"]);
    assert!(a.netns.exec_ok(&["ping", "-q", "-c", "600", "-i", "0.002", &b.ip.to_string()]));
    let (events, summary) = monitor.finish();
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(!events.is_empty() && events.len() <= 50 * cpus * 3, "{} events: {summary}", events.len());
    assert!(
        events.iter().any(|e| e["verdict"] == "forwarded"
            && e["reason"] == "local_delivery"
            && e["source"] == a.ip.to_string()
            && e["destination"] == b.ip.to_string()
            && e["protocol"] == "icmp"),
        "{events:#?}"
    );
    let counters = node.inspect("counters");
    let limited = counters["monitor_events"]["rate_limited"].as_u64().unwrap();
    assert!(limited > 100, "{counters}");
    assert!(!summary.contains(" 0 rate limited"), "{summary}");

    // Once the monitor is gone, forwards are no longer reported.
    let emitted = counters["monitor_events"]["emitted"].as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(datapath_tests::lab::ping(&a.netns, b.ip, 3));
    let after = node.inspect("counters")["monitor_events"]["emitted"].as_u64().unwrap();
    assert_eq!(after, emitted, "forward tracing switched off when the monitor stopped");
}

/// `inspect ... | head -1`: the reader goes away before the listing is
/// written. The CLI must end as other tools do (quietly, by SIGPIPE or
/// with success), not panic with "failed printing to stdout".
#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    require_root!();
    use std::os::unix::process::ExitStatusExt as _;
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let _a = node.add_pod("a");
    let _b = node.add_pod("b");
    for what in ["endpoints", "counters", "nodes", "config"] {
        // The read end is closed before the CLI starts: its first write fails.
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        drop(read_end);
        let out = node
            .in_node(&datapath_tests::bin_dir().join("datapath-agent"))
            .args(["inspect", what, "--bpffs-dir"])
            .arg(&node.bpffs_dir)
            .stdout(std::process::Stdio::from(write_end))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.is_empty(), "inspect {what} into a closed pipe said: {stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "inspect {what} into a closed pipe ended with {}",
            out.status
        );
    }
}

/// /healthz fails while the agent's event loop is stuck, and recovers with
/// it. The loop is stuck for real: a CNI DEL reads the pod's record from the
/// state directory while holding the agent's lock, and here the record is a
/// FIFO nobody writes (as a hung file system would hold the read).
#[test]
fn liveness_fails_while_the_event_loop_is_stuck() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.set_extra_config("event_loop_stall_seconds = 2\n");
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert_eq!(http_get_local(&node.netns, 9976, "/healthz").0, 200);

    let record = node.work_dir.join("state/endpoints").join(format!("{}.json", b.host_veth));
    std::fs::remove_file(&record).unwrap();
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let del = {
        let cni = node.cni_config();
        let env: Vec<(String, String)> = Node::cni_env("DEL", &b.container_id, "")
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let program = node.in_node(&datapath_tests::bin_dir().join("datapath-cni"));
        std::thread::spawn(move || {
            let mut program = program;
            program
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_PATH", format!("{}:/usr/lib/cni", datapath_tests::bin_dir().display()))
                .envs(env)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null());
            let mut child = program.spawn().unwrap();
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(cni.to_string().as_bytes()).unwrap();
            child.wait().unwrap()
        })
    };
    wait_for("/healthz to fail", Duration::from_secs(30), || {
        http_get_local(&node.netns, 9976, "/healthz").0 == 503
    });
    let (_, body) = http_get_local(&node.netns, 9976, "/healthz");
    assert!(body.contains("event loop has not turned"), "{body}");
    assert!(ping(&a.netns, b.ip, 1), "forwarding goes on meanwhile");

    // A writer comes and goes: the read ends (with an unreadable record).
    std::fs::OpenOptions::new().write(true).open(&record).unwrap();
    wait_for("/healthz to recover", Duration::from_secs(30), || {
        http_get_local(&node.netns, 9976, "/healthz").0 == 200
    });
    del.join().unwrap();
    std::fs::remove_file(&record).unwrap();
    let c = node.add_pod("c");
    assert!(ping(&c.netns, a.ip, 1), "the agent works again");
}

/// /readyz: ready while the datapath is in place, with a rejected edit of
/// the config file shown (and counted in /metrics) until a good one comes;
/// not ready once the datapath is gone (a node-level link pin removed).
#[test]
fn readiness_shows_rejected_config_edits_and_follows_the_datapath() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let readyz = |node: &Node| http_get_local(&node.netns, 9976, "/readyz");
    wait_for("ready", Duration::from_secs(30), || readyz(&node).0 == 200);
    let rejected = |node: &Node, reason: &str| {
        let (_, metrics) = http_get_local(&node.netns, 9976, "/metrics");
        sample(&metrics, "pod_datapath_config_edits_rejected_total", &format!("reason=\"{reason}\""))
    };
    assert_eq!(rejected(&node, "invalid"), Some(0));

    // An invalid edit: nothing applied, still ready, the error shown and counted.
    let good = std::fs::read_to_string(node.config_path()).unwrap();
    std::fs::write(node.config_path(), format!("monitor_events_per_second = 0\n{good}")).unwrap();
    wait_for("the rejected edit shown", Duration::from_secs(30), || {
        readyz(&node).1.contains("last rejected config edit")
    });
    let (status, body) = readyz(&node);
    assert_eq!(status, 200, "the running config stays: {body}");
    assert!(body.contains("monitor_events_per_second"), "the error names the field: {body}");
    assert_eq!(rejected(&node, "invalid"), Some(1));
    // A good edit clears it.
    std::fs::write(node.config_path(), &good).unwrap();
    wait_for("the error cleared", Duration::from_secs(30), || {
        !readyz(&node).1.contains("last rejected config edit")
    });

    // A field only a restart changes: counted and shown too.
    std::fs::write(node.config_path(), format!("ebpf_log = \"debug\"\n{good}")).unwrap();
    wait_for("the restart-only edit shown", Duration::from_secs(30), || {
        readyz(&node).1.contains("`ebpf_log` changed")
    });
    assert_eq!(rejected(&node, "needs_restart"), Some(1));
    std::fs::write(node.config_path(), &good).unwrap();

    // The datapath taken away under the agent: not ready.
    let uplink_link =
        std::fs::read_dir(node.bpffs_dir.join("node-links")).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&uplink_link).unwrap();
    wait_for("not ready", Duration::from_secs(30), || readyz(&node).0 == 503);
    let (_, body) = readyz(&node);
    assert!(body.contains("not loaded") && body.contains(&uplink_link.display().to_string()), "{body}");
    assert_eq!(http_get_local(&node.netns, 9976, "/healthz").0, 200, "still live");
    // A restart puts it back.
    node.stop_agent();
    node.start_agent();
    wait_for("ready again", Duration::from_secs(30), || readyz(&node).0 == 200);
}

/// Lower the agent's limit on open files to `limit` (as a tight container
/// limit would have it).
fn limit_open_files(pid: u32, limit: u64) {
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: a valid rlimit for another process; no old limit asked for.
    let rc = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &rlimit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// `count` TCP connections to 127.0.0.1:`port` in the node, held open
/// without a byte sent (each connect waits at most a second).
fn idle_connections(node: &Node, port: u16, count: usize) -> Vec<std::net::TcpStream> {
    datapath_tests::lab::in_netns(&node.netns.path(), move || {
        (0..count)
            .filter_map(|_| {
                let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(1)).ok()
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// Whether the server closed `conn` within `within` (EOF or reset), reading
/// whatever it sent first.
fn closed_within(conn: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        conn.set_read_timeout(Some(left)).unwrap();
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Whoever reaches the health endpoint (a pod, on a DaemonSet's
/// 0.0.0.0:9976) cannot hold it: connections that send no request, or only
/// part of one, are closed after a timeout; more connections than the cap
/// push out the oldest idle ones, so /healthz stays answered and the agent
/// keeps file descriptors for CNI calls.
#[test]
fn idle_health_connections_cannot_starve_the_agent() {
    require_root!();
    use std::{
        io::Write as _,
        time::{Duration, Instant},
    };
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    limit_open_files(node.agent_pid().unwrap(), 256);

    let mut held = idle_connections(&node, 9976, 400);
    assert!(held.len() >= 300, "{} connections made", held.len());
    let asked = Instant::now();
    let (status, body) = http_get_local(&node.netns, 9976, "/healthz");
    let answered = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(answered < Duration::from_secs(1), "/healthz answered after {answered:?}");
    // The CNI socket still gets a file descriptor.
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    // The connections beyond the cap were closed at once.
    let open =
        held.iter_mut().map(|c| !closed_within(c, Duration::from_millis(10))).filter(|open| *open).count();
    assert!(open <= 64, "{open} idle connections still open");

    // A request sent in part, and a connection that sends nothing: closed
    // after the header timeout.
    let mut partial = idle_connections(&node, 9976, 2);
    partial[0].write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let started = Instant::now();
    for conn in &mut partial {
        assert!(closed_within(conn, Duration::from_secs(15)), "still open after {:?}", started.elapsed());
    }
    eprintln!("idle and partial connections closed after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(2), "not before the client had time to send");
    // A complete request is still answered.
    assert_eq!(http_get_local(&node.netns, 9976, "/healthz").0, 200);
}

/// A `datapath-agent monitor` reading into `stdout` (a pipe), its stderr
/// captured; returns once it is watching.
fn spawn_monitor(node: &Node, args: &[&str]) -> std::process::Child {
    use std::io::Read as _;
    let mut child = node
        .in_node(&datapath_tests::bin_dir().join("datapath-agent"))
        .args(["monitor", "--bpffs-dir"])
        .arg(&node.bpffs_dir)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while stderr.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        first.push(byte[0]);
    }
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.starts_with("monitoring"), "monitor did not start: {first}");
    // Keep the rest of stderr for the test (the child keeps writing into it).
    child.stderr = Some(stderr);
    child
}

fn wait_for_exit(child: &mut std::process::Child, within: std::time::Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("monitor still running after {within:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn rest_of_stderr(child: &mut std::process::Child) -> String {
    use std::io::Read as _;
    let mut text = String::new();
    child.stderr.take().unwrap().read_to_string(&mut text).unwrap();
    text
}

/// `monitor --forwards | head -1`: the reader goes away; the monitor ends
/// without a panic and puts forward tracing back as it found it. So does
/// SIGTERM or SIGINT.
#[test]
fn a_monitor_into_a_closed_pipe_restores_forward_tracing() {
    require_root!();
    use std::io::BufRead as _;
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert_eq!(node.trace_forwards(), 0);

    let mut monitor = spawn_monitor(&node, &["--forwards"]);
    assert_eq!(node.trace_forwards(), 1);
    let traffic = std::thread::spawn({
        let name = a.netns.name.clone();
        let dst = b.ip.to_string();
        move || {
            datapath_tests::sh_ok(&[
                "ip", "netns", "exec", &name, "ping", "-q", "-c", "40", "-i", "0.05", &dst,
            ])
        }
    });
    // `head -1`: one line read, then the pipe closed.
    let mut line = String::new();
    std::io::BufReader::new(monitor.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("forwarded"), "{line}");
    let status = wait_for_exit(&mut monitor, std::time::Duration::from_secs(10));
    let stderr = rest_of_stderr(&mut monitor);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(status.code() != Some(101), "{status}: {stderr}");
    assert_eq!(node.trace_forwards(), 0, "forward tracing switched off again: {stderr}");
    assert!(traffic.join().unwrap());

    for signal in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
        let mut monitor = spawn_monitor(&node, &["--forwards"]);
        assert_eq!(node.trace_forwards(), 1);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(monitor.id() as i32), signal).unwrap();
        let status = wait_for_exit(&mut monitor, std::time::Duration::from_secs(10));
        assert!(status.success(), "{signal}: {status}");
        assert_eq!(node.trace_forwards(), 0, "after {signal}");
    }
}

/// One monitor at a time (the ring buffer has one reader): a second is
/// refused naming the first. Forward tracing left on by a SIGKILLed
/// monitor is switched off by the next monitor, and by the agent.
#[test]
fn one_monitor_at_a_time_and_a_killed_ones_tracing_does_not_stay_on() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");

    let mut first = spawn_monitor(&node, &["--forwards"]);
    let second = node
        .in_node(&datapath_tests::bin_dir().join("datapath-agent"))
        .args(["monitor", "--seconds", "5", "--bpffs-dir"])
        .arg(&node.bpffs_dir)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second monitor ran: {said}");
    assert!(said.contains("another monitor") && said.contains(&format!("pid {}", first.id())), "{said}");
    assert_eq!(node.trace_forwards(), 1, "the first monitor's tracing stays");

    // SIGKILL: nothing is restored by the monitor itself. The agent
    // notices no monitor holds it any more.
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = std::time::Instant::now();
    while node.trace_forwards() != 0 {
        assert!(killed.elapsed() < std::time::Duration::from_secs(15), "still on:\n{}", node.agent_log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    node.wait_for_log("forward tracing", std::time::Duration::from_secs(2));

    // With the agent down, the next monitor does it: a plain monitor shows
    // drops only, as it says.
    node.stop_agent();
    let mut killed = spawn_monitor(&node, &["--forwards"]);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(node.trace_forwards(), 1);
    let plain = node.monitor(&["--seconds", "2"]);
    assert_eq!(node.trace_forwards(), 0, "the plain monitor switched the leftover off");
    assert!(ping(&a.netns, b.ip, 3));
    let (events, summary) = plain.finish();
    assert!(events.iter().all(|e| e["verdict"] != "forwarded"), "{events:#?}\n{summary}");
    assert_eq!(node.trace_forwards(), 0);
}

/// `promtool check metrics` on `body`: `Err` with what it said if it
/// failed or found anything to lint.
pub(super) fn promtool_check(body: &str) -> Result<(), String> {
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run promtool (scripts/setup.sh installs it)");
    let said =
        format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    if check.status.success() && said.is_empty() { Ok(()) } else { Err(said) }
}

/// A node with pods a and b, and `spoofed` pings a sent from an address
/// not its own (dropped, `spoofed_source`) once the gateway is resolved
/// with its real one (else its ARP is spoofed too).
fn node_with_spoofed_drops(spoofed: u32) -> (Node, datapath_tests::lab::Pod, datapath_tests::lab::Pod) {
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    assert!(!ping_from_spoofed_address(&a, "10.244.1.250", b.ip, spoofed));
    (node, a, b)
}

/// `/metrics` passes `promtool check metrics` (the Prometheus text format
/// by default, as curl and promtool read it), and answers OpenMetrics to a
/// scraper that asks for it as Prometheus does; no series has empty braces
/// or pairs a reason with a program that never drops for it (until
/// counted); the build is named.
#[test]
fn metrics_pass_promtool_in_both_formats() {
    require_root!();
    let promtool = "promtool";
    if std::process::Command::new(promtool).arg("--version").output().is_err() {
        let ci = std::env::var_os("CI").is_some_and(|v| v == "true");
        assert!(!ci, "promtool is missing (scripts/setup.sh installs it), and CI=true forbids skipping");
        eprintln!("skipped: promtool is not installed (scripts/setup.sh installs it)");
        return;
    }
    let (node, _a, _b) = node_with_spoofed_drops(1);
    wait_for("the drop counted", Duration::from_secs(5), || {
        node.inspect("counters")["drops"]["spoofed_source"].as_u64() >= Some(1)
    });

    let (status, head, text) = http_get_local_with(&node.netns, 9976, "/metrics", &[]).unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    if let Err(said) = promtool_check(&text) {
        panic!("promtool check metrics: {said}\n{text}");
    }
    assert!(text.contains("# TYPE pod_datapath_drops_total counter\n"), "{text}");
    assert_eq!(sample(&text, "pod_datapath_drops_total", "reason=\"spoofed_source\""), Some(1), "{text}");

    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;\
                      q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (status, head, openmetrics) =
        http_get_local_with(&node.netns, 9976, "/metrics", &[("Accept", prometheus)]).unwrap();
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    assert!(openmetrics.contains("# TYPE pod_datapath_drops counter\n") && openmetrics.ends_with("# EOF\n"));

    for body in [&text, &openmetrics] {
        assert!(!body.contains("{}"), "empty braces:\n{body}");
        assert!(
            !body.contains("direction=\"to_pod\",reason=\"spoofed_source\""),
            "an impossible pair:\n{body}"
        );
        assert!(body.contains("direction=\"from_pod\",reason=\"spoofed_source\""), "{body}");
        let build = body.lines().find(|l| l.starts_with("pod_datapath_build_info{")).expect("build info");
        assert!(
            build.contains("version=\"") && build.contains("commit=\"") && build.ends_with(" 1"),
            "{build}"
        );
    }
    // Every (direction, reason) pair a program may drop for is there from 0.
    let drops = text.lines().filter(|l| l.starts_with("pod_datapath_drops_total{")).count();
    let declared: usize = datapath_common::DropReason::ALL.iter().map(|r| r.directions().len()).sum();
    assert_eq!(drops, declared, "{text}");
}

/// `--log-format json`: every line the agent logs is one JSON object
/// (timestamp, level, message, fields), from its start line, which names
/// the build, to its pods' endpoint lines. `/metrics` has the agent
/// process's own metrics under the names every Prometheus client library
/// gives them, with the values /proc gives for the agent's pid.
#[test]
fn json_logs_and_the_processs_own_metrics() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.agent_options = vec!["--log-format".into(), "json".into()];
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));

    let log = node.agent_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{log}")))
        .collect();
    for line in &lines {
        for field in ["timestamp", "level", "message", "target"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
    }
    let start = lines.iter().find(|l| l["message"] == "datapath-agent starting").expect("start line");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"), "{start}");
    assert!(start["commit"].as_str().is_some_and(|c| !c.is_empty()), "{start}");
    let added: Vec<_> = lines.iter().filter(|l| l["message"] == "endpoint added").collect();
    assert_eq!(added.len(), 2, "{log}");
    assert!(added.iter().any(|l| l["ip"] == a.ip.to_string()), "{added:?}");

    let (status, head, text) = http_get_local_with(&node.netns, 9976, "/metrics", &[]).unwrap();
    assert_eq!(status, 200, "{head}");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name}:\n{text}"))
            .parse()
            .unwrap()
    };
    let pid = node.agent_pid().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss_kb: f64 = proc_status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let rss = value("process_resident_memory_bytes");
    assert!(
        rss > 1e6 && (0.5..2.0).contains(&(rss / (vm_rss_kb * 1024.0))),
        "RSS {rss} against VmRSS {vm_rss_kb} kB"
    );
    assert!(value("process_virtual_memory_bytes") >= rss);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    let open = value("process_open_fds");
    assert!((open - fds).abs() <= 16.0, "open fds {open}, /proc says {fds}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(value("process_max_fds"), soft);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = value("process_start_time_seconds");
    assert!(started <= now + 1.0 && now - started < 600.0, "started {started}, now {now}");
    let cpu = value("process_cpu_seconds_total");
    assert!((0.0..600.0).contains(&cpu), "cpu {cpu}");
    assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"), "{text}");
}

/// `monitor --pod NAME --reason R`: only that pod's events of that reason,
/// each naming the pod (from the agent's records, found through
/// `--config`); `inspect --config` finds the pins and records the same way.
/// An unknown pod or reason is refused, naming what exists. `inspect` run
/// outside the agent's network namespace names no interface after that
/// namespace's index table (it named other interfaces), and the veths
/// after the agent's records.
#[test]
fn monitor_keeps_one_pods_events_of_one_reason_and_names_the_pod() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod_as("a", "shop", "web-a");
    let b = node.add_pod_as("b", "shop", "web-b");
    let c = node.add_pod_as("c", "shop", "web-c");
    assert!(ping(&a.netns, c.ip, 1) && ping(&b.netns, c.ip, 1));
    let config = node.config_path().display().to_string();
    let agent = |args: &[&str]| {
        let out =
            node.in_node(&datapath_tests::bin_dir().join("datapath-agent")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // inspect finds the pins and the records from the config alone.
    let (ok, listing, err) = agent(&["inspect", "endpoints", "--json", "--config", &config]);
    assert!(ok, "{err}");
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(listing.as_array().unwrap().len(), 3, "{listing}");
    assert!(listing.to_string().contains("web-b"), "{listing}");

    let mut monitor = std::process::Command::new("nsenter");
    monitor
        .arg(format!("--net={}", node.netns.path().display()))
        .arg(datapath_tests::bin_dir().join("datapath-agent"))
        .args(["monitor", "--json", "--seconds", "4", "--config", &config, "--pod", "web-b"])
        .args(["--reason", "spoofed_source"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = monitor.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Spoofed pings from a and from b, plain pings from a: only b's spoofed ones stay.
    assert!(!ping_from_spoofed_address(&a, "10.244.1.250", c.ip, 2));
    assert!(!ping_from_spoofed_address(&b, "10.244.1.251", c.ip, 2));
    assert!(ping(&a.netns, c.ip, 2));
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(!events.is_empty(), "b's drops are shown: {stdout}");
    for event in &events {
        assert_eq!(event["reason"], "spoofed_source", "{event}");
        assert_eq!(event["pod"], "shop/web-b", "{event}");
        assert_eq!(event["interface"], b.host_veth.as_str(), "{event}");
    }
    // The table names the pod too.
    let b_ip = b.ip.to_string();
    let (ok, table, err) = std::thread::scope(|scope| {
        let table =
            scope.spawn(|| agent(&["monitor", "--seconds", "3", "--config", &config, "--pod", &b_ip]));
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert!(!ping_from_spoofed_address(&b, "10.244.1.251", c.ip, 2));
        table.join().unwrap()
    });
    assert!(ok, "{err}");
    assert!(table.lines().count() >= 2, "{table}");
    assert!(table.lines().all(|l| l.ends_with(" pod shop/web-b")), "{table}");

    // From the host's namespace, against this node's pins: no interface is
    // named after the host's own index table; the records name the veths.
    let host = |args: &[&str]| {
        let out = std::process::Command::new(datapath_tests::bin_dir().join("datapath-agent"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (json, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (here, err) = host(&["inspect", "config", "--json", "--config", &config]);
    assert!(here["uplink"].is_null(), "{here}");
    assert!(err.contains("not in the agent's network namespace"), "{err}");
    let (endpoints, _) = host(&["inspect", "endpoints", "--json", "--config", &config]);
    let names: std::collections::BTreeSet<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["host_ifname"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        std::collections::BTreeSet::from([a.host_veth.as_str(), b.host_veth.as_str(), c.host_veth.as_str()])
    );
    let (ok, inside, err) = agent(&["inspect", "config", "--json", "--config", &config]);
    assert!(ok && !err.contains("note:"), "{err}");
    let inside: serde_json::Value = serde_json::from_str(&inside).unwrap();
    assert_eq!(inside["uplink"], datapath_tests::lab::UPLINK, "{inside}");

    let (ok, _, err) = agent(&["monitor", "--seconds", "1", "--config", &config, "--pod", "nobody"]);
    assert!(!ok && err.contains("no pod \"nobody\" on this node"), "{err}");
    let (ok, _, err) = agent(&["monitor", "--seconds", "1", "--config", &config, "--reason", "spoofed"]);
    assert!(!ok && err.contains("spoofed_source") && err.contains("local_delivery"), "{err}");
    let (ok, _, err) =
        agent(&["monitor", "--seconds", "1", "--config", &config, "--reason", "local_delivery"]);
    assert!(!ok && err.contains("add --forwards"), "{err}");
}

/// Bytes in a Kubernetes memory quantity ("64Mi", "256M", "1Gi").
fn quantity_bytes(q: &str) -> u64 {
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let factor = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("unit {other}"),
    };
    number.parse::<u64>().unwrap() * factor
}

/// The DaemonSet's memory request and limit fit what the agent takes at
/// the default sizes: its resident memory plus its maps (charged to the
/// container's memory cgroup, as the kernel accounts BPF map memory to
/// the process that creates the map). The request covers both, the limit
/// twice both. Measured on a live agent with two pods; the figures are
/// printed for docs/operations.md ("Sizing").
#[test]
fn the_daemonsets_memory_fits_the_agent_and_its_maps() {
    require_root!();
    let (node, _a, _b) = node_with_spoofed_drops(1);
    let pid = node.agent_pid().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = 1024
        * proc_status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap();
    let mut maps = 0;
    let mut largest = Vec::new();
    for pin in std::fs::read_dir(node.bpffs_dir.join("maps")).unwrap().flatten() {
        let out = std::process::Command::new("bpftool")
            .args(["map", "show", "pinned"])
            .arg(pin.path())
            .arg("-j")
            .output()
            .unwrap();
        let Ok(map) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { continue };
        let bytes = map["bytes_memlock"].as_u64().unwrap_or(0);
        maps += bytes;
        largest.push((bytes, pin.file_name().to_string_lossy().into_owned()));
    }
    largest.sort_unstable_by(|a, b| b.cmp(a));
    largest.truncate(4);
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/datapath.yaml")).unwrap();
    let daemonset = serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let agent = &daemonset["spec"]["template"]["spec"]["containers"][0];
    let request = quantity_bytes(agent["resources"]["requests"]["memory"].as_str().unwrap());
    let limit = quantity_bytes(agent["resources"]["limits"]["memory"].as_str().unwrap());
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "agent RSS {:.1} MiB + maps {:.1} MiB (largest {:?}) = {:.1} MiB; DaemonSet request {:.0} MiB, limit {:.0} MiB",
        mib(rss),
        mib(maps),
        largest.iter().map(|(b, n)| format!("{n} {:.1} MiB", mib(*b))).collect::<Vec<_>>(),
        mib(rss + maps),
        mib(request),
        mib(limit)
    );
    assert!(maps > 10 << 20, "the maps were read: {maps} bytes");
    assert!(request >= rss + maps, "the request covers the agent and its maps");
    assert!(limit >= 2 * (rss + maps), "the limit leaves the agent room to grow");
}

/// `deploy/grafana-dashboard.json` is a dashboard Grafana can import
/// (unique panel ids, a Prometheus data-source variable), each of its
/// queries is valid PromQL (`promtool check rules` on them, Grafana's
/// variables filled in), and every metric it queries is one a live agent
/// exports (the Kubernetes watch errors only in Kubernetes mode: checked in
/// `kubernetes::health_is_served_while_waiting_for_the_api_and_follows_the_watches`).
#[test]
fn the_grafana_dashboard_queries_what_the_agent_exports() {
    require_root!();
    if std::process::Command::new("promtool").arg("--version").output().is_err() {
        let ci = std::env::var_os("CI").is_some_and(|v| v == "true");
        assert!(!ci, "promtool is missing (scripts/setup.sh installs it), and CI=true forbids skipping");
        eprintln!("skipped: promtool is not installed (scripts/setup.sh installs it)");
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: std::collections::BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    assert!(dashboard["templating"]["list"].as_array().unwrap().iter().any(|v| v["type"] == "datasource"));
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(exprs.len() >= 15, "{exprs:?}");

    // Valid PromQL: as recording rules, which promtool parses.
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, expr)| {
            let expr =
                expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$job", ".*");
            format!("      - record: dashboard:query{i}\n        expr: {}\n", serde_json::Value::from(expr))
        })
        .collect();
    let (node, _a, _b) = node_with_spoofed_drops(1);
    let rules_file = node.work_dir.join("dashboard-rules.yaml");
    std::fs::write(&rules_file, format!("groups:\n  - name: dashboard\n    rules:\n{rules}")).unwrap();
    let check =
        std::process::Command::new("promtool").args(["check", "rules"]).arg(&rules_file).output().unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    let (status, head, text) = http_get_local_with(&node.netns, 9976, "/metrics", &[]).unwrap();
    assert_eq!(status, 200, "{head}");
    let exported = |name: &str| {
        text.lines().any(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
    };
    let mut queried = std::collections::BTreeSet::new();
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("pod_datapath_") || word.starts_with("process_") {
                queried.insert(word.to_owned());
            }
        }
    }
    let missing: Vec<_> =
        queried.iter().filter(|m| !m.starts_with("pod_datapath_kubernetes_") && !exported(m)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}\n{text}");
    assert!(queried.len() >= 12, "{queried:?}");
}

/// Run `status --json` until `done` holds for its answer (30 s at most).
fn wait_for_status(
    status: &dyn Fn(bool) -> std::process::Output,
    done: impl Fn(&serde_json::Value) -> bool,
) -> (std::process::ExitStatus, serde_json::Value) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = status(true);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if done(&view) {
            return (out.status, view);
        }
        assert!(std::time::Instant::now() < deadline, "status never got there: {view}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `datapath-agent status`: one summary from the agent and the pins, in
/// text and JSON; exit status 0 when ready, 1 when the agent does not
/// answer (the pinned datapath still said to be forwarding).
#[test]
fn status_summarises_the_node_and_fails_without_its_agent() {
    require_root!();
    let (mut node, a, b) = node_with_spoofed_drops(2);
    let (netns, config) = (node.netns.path(), node.config_path());
    let status = |json: bool| {
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={}", netns.display())).arg(datapath_tests::bin_dir().join("datapath-agent"));
        cmd.arg("status").arg("--config").arg(&config);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = status(true);
    assert!(out.status.success(), "{out:?}");
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(view["healthy"], true, "{view}");
    assert!(view["agent"].as_str().unwrap().contains("(commit "), "{view}");
    assert_eq!((view["mode"].as_str(), view["source"].as_str()), (Some("native"), Some("static")), "{view}");
    assert_eq!(view["node_ip"], "10.250.0.1");
    assert_eq!(view["endpoints"], 2);
    assert_eq!(view["maps"]["endpoints"]["entries"], 2);
    assert_eq!(view["recent_drops"]["spoofed_source"], 2, "the last minute's drops: {view}");
    // The collector sweeps at start and every 5 s: the table's fill as it
    // last counted, and how long ago.
    assert_eq!(
        view["maps"]["conntrack"]["capacity"],
        u64::from(datapath_common::DEFAULT_CONNTRACK_ENTRIES),
        "{view}"
    );
    assert!(view["maps"]["conntrack"]["entries"].is_u64(), "{view}");
    assert!(view["last_conntrack_sweep_seconds_ago"].as_u64().is_some_and(|s| s <= 10), "{view}");
    assert!(view["last_conntrack_sweep_error"].is_null(), "{view}");
    assert_eq!(view["agent_errors"], 0, "{view}");
    // The last run of each reconciler and its result.
    let reconciled: Vec<&str> =
        view["reconciles"].as_array().unwrap().iter().map(|r| r["what"].as_str().unwrap()).collect();
    assert!(reconciled.contains(&"peers") && reconciled.contains(&"services"), "{view}");
    assert!(view["reconciles"].as_array().unwrap().iter().all(|r| r["error"].is_null()), "{view}");
    let out = status(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("ready") && text.contains("spoofed_source 2"), "{text}");
    assert!(text.contains("s ago, ok") && text.contains("map conntrack"), "{text}");
    assert!(text.contains("reconciled peers"), "{text}");

    // A peer the node cannot route to (not on the uplink's subnet): the
    // peers reconciler fails, status says so and exits 1, though the agent
    // stays ready; fixed, healthy again.
    let good = std::fs::read_to_string(node.config_path()).unwrap();
    let unroutable = "\n[[peers]]\nname = \"far\"\nnode_ip = \"192.0.2.9\"\npod_cidr = \"10.244.9.0/24\"\n";
    std::fs::write(node.config_path(), format!("{good}{unroutable}")).unwrap();
    let failed = wait_for_status(&status, |view| view["failed_reconciles"] == serde_json::json!(["peers"]));
    assert_eq!((failed.0.code(), failed.1["ready"].as_bool()), (Some(1), Some(true)), "{:?}", failed.1);
    let text = String::from_utf8_lossy(&status(false).stdout).into_owned();
    assert!(
        text.contains("reconciled peers") && text.contains("FAILED (retried)") && text.contains("192.0.2.9"),
        "{text}"
    );
    std::fs::write(node.config_path(), &good).unwrap();
    let fixed = wait_for_status(&status, |view| view["healthy"] == true);
    assert_eq!(fixed.0.code(), Some(0), "{:?}", fixed.1);

    // A rejected config edit (a syntax error: status reads the paths from
    // the lines that still parse) is shown; the agent stays ready on its config.
    let good = std::fs::read_to_string(node.config_path()).unwrap();
    std::fs::write(node.config_path(), format!("{good}\nmode = 7\n")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = status(false);
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("LAST EDIT REJECTED") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the rejected edit not shown: {out:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::fs::write(node.config_path(), good).unwrap();

    node.stop_agent();
    let out = status(false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text.contains("NOT ANSWERING") && text.contains("pinned (forwarding without the agent)"),
        "{text}"
    );
    assert!(ping(&a.netns, b.ip, 1), "and it does");
}
