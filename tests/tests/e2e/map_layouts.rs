//! Pinned maps across releases: every pin carries its layout version, and
//! a pin made with another layout is migrated or refused as docs/upgrade.md
//! says, never misread. Pins of other layouts are made here as another
//! build would leave them (with bpftool, or by renaming ours).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, MapInfo, PerCpuArray, PerCpuValues};
use datapath_agent::bpf::map_layout::ConntrackEntryV2;
use datapath_common::{
    CT_FORWARD, CT_SEEN, CT_STATEFUL, ConntrackEntry, ConntrackKey, DROP_COUNTER_SLOTS, DROP_REASON_SLOTS,
    FORWARD_COUNTER_SLOTS, PacketCount,
};
use datapath_tests::{
    bin_dir,
    lab::{Fabric, Node, peered_nodes, ping, ping_from_spoofed_address},
    require_root, sh,
    traffic::{Stream, ping_flood, ping_result},
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_PORT: u16 = 8080;

/// `datapath-agent run` that is expected to stop by itself (a refusal).
fn run_agent_to_exit(node: &Node) -> Output {
    let mut child = node
        .in_node(&bin_dir().join("datapath-agent"))
        .args(["run", "--config"])
        .arg(node.config_path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("the agent did not refuse but kept running:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    eprintln!("agent exited with {}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

fn maps_dir(node: &Node) -> PathBuf {
    node.bpffs_dir.join("maps")
}

/// File names under `maps/`, sorted.
fn pins(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(maps_dir(node))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

fn map_id(pin: &Path) -> u32 {
    MapInfo::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display())).id()
}

fn max_entries(pin: &Path) -> u32 {
    MapInfo::from_pin(pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display())).max_entries()
}

/// CLOCK_MONOTONIC now, as the programs stamp entries: a connection seen
/// now, which the collector keeps.
fn monotonic_now_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

fn bpftool_create(pin: &Path, kind: &str, key: u32, value: u32, entries: u32, name: &str) {
    let (key, value, entries) = (key.to_string(), value.to_string(), entries.to_string());
    sh(&[
        "bpftool",
        "map",
        "create",
        &pin.display().to_string(),
        "type",
        kind,
        "key",
        &key,
        "value",
        &value,
        "entries",
        &entries,
        "name",
        name,
    ]);
}

#[test]
fn a_pin_with_another_value_size_is_refused_before_anything_is_touched() {
    require_root!();
    let node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    // ENDPOINTS under this build's layout version, but 20-byte values: made
    // by another build (this one's Endpoint is 24 bytes). With an entry.
    std::fs::create_dir_all(maps_dir(&node)).unwrap();
    let pin = maps_dir(&node).join("endpoints-v1");
    bpftool_create(&pin, "hash", 4, 20, 65_536, "ENDPOINTS");
    let mut key_value: Vec<String> =
        ["key", "10", "244", "1", "7", "value"].iter().map(|s| s.to_string()).collect();
    key_value.extend((0..20).map(|i| i.to_string()));
    let mut update = vec!["bpftool", "map", "update", "pinned"];
    let pin_text = pin.display().to_string();
    update.push(&pin_text);
    update.extend(key_value.iter().map(String::as_str));
    sh(&update);
    let id = map_id(&pin);

    let out = run_agent_to_exit(&node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent must refuse: {stderr}");
    for part in [
        "map ENDPOINTS",
        pin_text.as_str(),
        "20-byte values",
        "24-byte values",
        "Nothing was changed",
        "remove",
    ] {
        assert!(stderr.contains(part), "refusal lacks {part:?}:\n{stderr}");
    }
    // Untouched: the same map with its entry, nothing else pinned, no link.
    assert_eq!(pins(&node), vec!["endpoints-v1"]);
    assert_eq!(map_id(&pin), id);
    let dump = sh(&["bpftool", "-j", "map", "dump", "pinned", &pin_text]);
    assert!(dump.contains("\"0x0a\",\"0xf4\",\"0x01\",\"0x07\"") || dump.contains("10,244,1,7"), "{dump}");
    for dir in ["links", "node-links"] {
        let entries = std::fs::read_dir(node.bpffs_dir.join(dir)).map(|d| d.count()).unwrap_or(0);
        assert_eq!(entries, 0, "{dir} must stay empty");
    }
}

#[test]
fn a_rollback_over_a_newer_layout_is_refused_and_forwarding_goes_on() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    node.stop_agent();
    // As a newer build that changed the meaning of ENDPOINTS' values (and
    // the monitor event) would leave them: same sizes, version 2.
    for name in ["endpoints", "monitor_events"] {
        std::fs::rename(
            maps_dir(&node).join(format!("{name}-v1")),
            maps_dir(&node).join(format!("{name}-v2")),
        )
        .unwrap();
    }
    let before = pins(&node);
    let link = node.bpffs_dir.join("links").join(&a.host_veth);
    let program = node.link_prog_id(&link);

    let out = run_agent_to_exit(&node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "same sizes, another version: must not be read: {stderr}");
    for part in
        ["map ENDPOINTS", "endpoints-v2", "layout v2, newer than the v1", "Run a build that reads layout v2"]
    {
        assert!(stderr.contains(part), "refusal lacks {part:?}:\n{stderr}");
    }
    assert_eq!(pins(&node), before, "no pin made, renamed or removed");
    assert_eq!(node.link_prog_id(&link), program, "no program switched");
    assert!(ping(&a.netns, b.ip, 3), "the attached programs keep forwarding");

    // inspect and monitor say which layout they met instead of failing vaguely.
    for args in [&["inspect", "endpoints"][..], &["monitor", "--seconds", "1"][..]] {
        let out = node
            .in_node(&bin_dir().join("datapath-agent"))
            .args(args)
            .arg("--bpffs-dir")
            .arg(&node.bpffs_dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("pinned only with another layout") && stderr.contains("-v2"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn pins_from_a_build_before_layout_versions_are_adopted_without_a_lost_packet() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    let endpoints_before = node.programmed_endpoints();
    let config_before = node.inspect("config");
    node.kill_agent();
    // What the release before layout versions pinned: the same maps without
    // a version in their names, but for node_config, which had 24-byte
    // values (layout v1: no VXLAN port, no pod CIDR) and holds the node's
    // settings with the Service flag on; and without the maps added since.
    let mut ids = Vec::new();
    for name in pins(&node) {
        let path = maps_dir(&node).join(&name);
        if name == "node_config-v3" {
            std::fs::remove_file(&path).unwrap();
            continue;
        }
        if name.starts_with("icmp_budget")
            || name.starts_with("conntrack_clients")
            || name.starts_with("peer_mode_mismatches")
            || name.starts_with("policy_")
        {
            std::fs::remove_file(&path).unwrap();
            continue;
        }
        // conntrack is at v4 now (policy entries, sequence numbers, then data ends):
        // its unversioned pin, v1's 24-byte entries, is converted, not
        // renamed.
        if name == "conntrack-v4" {
            std::fs::remove_file(&path).unwrap();
            let v1 = maps_dir(&node).join("conntrack");
            bpftool_create(&v1, "hash", size_of::<ConntrackKey>() as u32, 24, 4096, "CONNTRACK");
            continue;
        }
        // The counters are at v2 (bytes next to packets): their unversioned
        // pins held v1's packets only (8-byte values), converted.
        if let Some(counters) = name.strip_suffix("_counters-v2") {
            std::fs::remove_file(&path).unwrap();
            let (slots, map) = match counters {
                "drop" => (DROP_COUNTER_SLOTS, "DROP_COUNTERS"),
                "forward" => (FORWARD_COUNTER_SLOTS, "FORWARD_COUNTE"),
                other => panic!("unexpected pin {other}"),
            };
            bpftool_create(
                &maps_dir(&node).join(format!("{counters}_counters")),
                "percpu_array",
                4,
                8,
                slots,
                map,
            );
            continue;
        }
        let bare = name.strip_suffix("-v1").unwrap_or_else(|| panic!("unexpected pin {name}")).to_owned();
        std::fs::rename(&path, maps_dir(&node).join(&bare)).unwrap();
        ids.push((name, map_id(&maps_dir(&node).join(&bare))));
    }
    let old_config = maps_dir(&node).join("node_config");
    bpftool_create(&old_config, "array", 4, 24, 1, "NODE_CONFIG");
    let link: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-n", &node.netns.name, "-j", "link", "show", "dptup0"])).unwrap();
    let uplink_ifindex = link[0]["ifindex"].as_u64().unwrap() as u32;
    let mut value: Vec<u8> = Vec::new();
    value.extend_from_slice(&node.node_ip.octets());
    value.extend_from_slice(&1u32.to_ne_bytes()); // native
    value.extend_from_slice(&uplink_ifindex.to_ne_bytes());
    value.extend_from_slice(&0u32.to_ne_bytes());
    value.extend_from_slice(&1u32.to_ne_bytes()); // VNI
    value.extend_from_slice(&1u32.to_ne_bytes()); // Service lookups on
    let old_config_text = old_config.display().to_string();
    let mut update: Vec<String> =
        ["bpftool", "map", "update", "pinned", &old_config_text, "key", "0", "0", "0", "0", "value"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    update.extend(value.iter().map(|b| b.to_string()));
    sh(&update.iter().map(String::as_str).collect::<Vec<_>>());

    let flood = ping_flood(&a.netns, b.ip, 600);
    std::thread::sleep(Duration::from_millis(500));
    node.start_agent();
    let (tx, rx) = ping_result(flood);
    eprintln!("adopting unversioned pins under a 5 ms ping flood: {rx}/{tx}");
    assert_eq!(rx, tx, "pings lost while adopting the pins");
    for (name, id) in &ids {
        assert_eq!(map_id(&maps_dir(&node).join(name)), *id, "{name}: the same map, renamed, not copied");
    }
    let now = pins(&node);
    assert!(
        now.contains(&"node_config-v3".to_owned()) && !now.contains(&"node_config".to_owned()),
        "{now:?}"
    );
    assert!(
        now.iter().all(|p| p.ends_with("-v1")
            || ["node_config-v3", "conntrack-v4", "drop_counters-v2", "forward_counters-v2"]
                .contains(&p.as_str())),
        "{now:?}"
    );
    assert_eq!(node.programmed_endpoints(), endpoints_before);
    assert_eq!(node.inspect("config"), config_before, "the node's settings as before");
    let log = node.agent_log();
    assert!(log.contains("pin renamed to its layout version"), "{log}");
    assert!(log.contains("converted from layout v1"), "node_config converted: {log}");
}

/// The previous release's node_config (layout v2, 36 bytes, no per-client
/// connection limit) is converted under traffic: the node's settings are
/// kept, the limit written a moment later.
#[test]
fn node_config_of_the_previous_layout_is_converted_without_a_lost_packet() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    assert!(ping(&a.netns, b.ip, 1));
    let config_before = node.inspect("config");
    node.kill_agent();
    let current = maps_dir(&node).join("node_config-v3");
    let value: Vec<String> = {
        let dump = sh(&[
            "bpftool",
            "-j",
            "map",
            "lookup",
            "pinned",
            &current.display().to_string(),
            "key",
            "0",
            "0",
            "0",
            "0",
        ]);
        let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
        v["value"]
            .as_array()
            .unwrap()
            .iter()
            .take(36)
            .map(|b| {
                let text = b.as_str().unwrap();
                u8::from_str_radix(text.trim_start_matches("0x"), 16).unwrap().to_string()
            })
            .collect()
    };
    let old = maps_dir(&node).join("node_config-v2");
    bpftool_create(&old, "array", 4, 36, 1, "NODE_CONFIG");
    let old_text = old.display().to_string();
    let mut update: Vec<&str> =
        vec!["bpftool", "map", "update", "pinned", &old_text, "key", "0", "0", "0", "0", "value"];
    update.extend(value.iter().map(String::as_str));
    sh(&update);
    std::fs::remove_file(&current).unwrap();

    let flood = ping_flood(&a.netns, b.ip, 600);
    std::thread::sleep(Duration::from_millis(500));
    node.start_agent();
    let (tx, rx) = ping_result(flood);
    assert_eq!(rx, tx, "pings lost while converting node_config");
    let now = pins(&node);
    assert!(
        now.contains(&"node_config-v3".to_owned()) && !now.contains(&"node_config-v2".to_owned()),
        "{now:?}"
    );
    assert_eq!(node.inspect("config"), config_before, "the node's settings as before");
    assert!(node.agent_log().contains("converted from layout v2"), "{}", node.agent_log());
}

#[test]
fn counters_survive_a_grown_counter_map_and_restart_on_an_incompatible_one() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    // ARP resolved with the real address first (else spoofed ARP is counted too).
    assert!(ping(&a.netns, b.ip, 1));
    assert!(!ping_from_spoofed_address(&a, "10.244.1.200", b.ip, 3));
    let spoofed = node.drop_count("spoofed_source");
    assert!(spoofed >= 3, "{spoofed}");
    node.stop_agent();

    // DROP_COUNTERS as an older build had it: layout v1 (packets only,
    // 8-byte values), with one direction fewer, holding the same counts.
    let (ours, fewer) = (DROP_COUNTER_SLOTS, DROP_COUNTER_SLOTS - DROP_REASON_SLOTS);
    let current = maps_dir(&node).join("drop_counters-v2");
    let drops = maps_dir(&node).join("drop_counters-v1");
    bpftool_create(&drops, "percpu_array", 4, 8, fewer, "DROP_COUNTERS");
    {
        let current: PerCpuArray<MapData, PacketCount> =
            PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(&current).unwrap())).unwrap();
        let mut older: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(MapData::from_pin(&drops).unwrap())).unwrap();
        for slot in 0..fewer {
            let values: Vec<u64> = current.get(&slot, 0).unwrap().iter().map(|c| c.packets).collect();
            older.set(slot, PerCpuValues::try_from(values).unwrap(), 0).unwrap();
        }
    }
    std::fs::remove_file(&current).unwrap();
    assert_eq!(max_entries(&drops), fewer);
    // MONITOR_COUNTERS with 16-byte values: unreadable, and only counters.
    let monitor_counters = maps_dir(&node).join("monitor_counters-v1");
    std::fs::remove_file(&monitor_counters).unwrap();
    bpftool_create(&monitor_counters, "percpu_array", 4, 16, 4, "MONITOR_COUNTE");

    node.start_agent();
    assert!(!drops.exists(), "the v1 pin is gone once converted");
    assert_eq!(max_entries(&current), ours, "grown to this build's size");
    assert_eq!(node.drop_count("spoofed_source"), spoofed, "counts carried over");
    let bytes = |node: &Node| node.inspect("counters")["drop_bytes"]["spoofed_source"].as_u64().unwrap();
    assert_eq!(bytes(&node), 0, "v1 had no bytes: counted from the upgrade on");
    assert_eq!(MapInfo::from_pin(&monitor_counters).unwrap().value_size(), 8, "replaced");
    let log = node.agent_log();
    assert!(log.contains("map migrated") && log.contains("DROP_COUNTERS"), "{log}");
    assert!(log.contains("map replaced by an empty one") && log.contains("MONITOR_COUNTERS"), "{log}");
    assert!(!pins(&node).iter().any(|p| p.ends_with("-new") || p.ends_with("_older")), "{:?}", pins(&node));
    // And counting goes on in the migrated map.
    assert!(!ping_from_spoofed_address(&a, "10.244.1.200", b.ip, 2));
    assert_eq!(node.drop_count("spoofed_source"), spoofed + 2);
    // Two pings of 84-byte IPv4 packets, 98-byte frames.
    assert_eq!(bytes(&node), 2 * 98);
}

/// Also the conversion of layout v2's entries (24 bytes, before the
/// sequence numbers) into v3's: every connection kept, field by field.
#[test]
fn a_conntrack_smaller_than_its_open_connections_is_refused() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    // 1500 tracked connections in a map of 2048; the config asks for 1024.
    std::fs::create_dir_all(maps_dir(&node)).unwrap();
    let pin = maps_dir(&node).join("conntrack-v2");
    let (key, value) = (size_of::<ConntrackKey>() as u32, size_of::<ConntrackEntryV2>() as u32);
    bpftool_create(&pin, "hash", key, value, 2048, "CONNTRACK");
    // Fresh, so the collector keeps them.
    let last_seen_ns = monotonic_now_ns();
    {
        let mut map: HashMap<MapData, ConntrackKey, ConntrackEntryV2> =
            HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap())).unwrap();
        for i in 0..1500u16 {
            let key = ConntrackKey {
                saddr: [10, 244, 1, 9],
                daddr: WEB_VIP.octets(),
                sport: i.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                protocol: 6,
                _pad: [0; 3],
            };
            let entry = ConntrackEntryV2 {
                nat_addr: [10, 244, 1, 7],
                nat_port: 8080u16.to_be_bytes(),
                kind: CT_FORWARD,
                flags: CT_STATEFUL | CT_SEEN,
                client_ipv4: [10, 244, 1, 9],
                service_id: 7,
                last_seen_ns,
            };
            map.insert(key, entry, 0).unwrap();
        }
    }
    let id = map_id(&pin);
    node.set_extra_config("conntrack_max_entries = 1024\n");

    let out = run_agent_to_exit(&node);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "1500 connections do not fit in 1024 entries: {stderr}");
    for part in ["map CONNTRACK", "1024 entries", "conntrack-v2", "Raise conntrack_max_entries", "is kept"] {
        assert!(stderr.contains(part), "refusal lacks {part:?}:\n{stderr}");
    }
    assert_eq!(map_id(&pin), id, "the old map is kept");
    assert_eq!(max_entries(&pin), 2048);
    assert!(!pins(&node).iter().any(|p| p.ends_with("-new")), "the new map is removed: {:?}", pins(&node));
    // With room enough, the same pin is migrated.
    node.set_extra_config("conntrack_max_entries = 4096\n");
    node.start_agent();
    let v4 = maps_dir(&node).join("conntrack-v4");
    assert_eq!(max_entries(&v4), 4096);
    assert!(!pin.exists(), "the v2 pin is replaced");
    assert_eq!(node.inspect("conntrack").as_array().unwrap().len(), 1500, "every connection kept");
    let map: HashMap<MapData, ConntrackKey, ConntrackEntry> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&v4).unwrap())).unwrap();
    let entries: Vec<_> = map.iter().map(Result::unwrap).collect();
    assert_eq!(entries.len(), 1500);
    for (key, entry) in entries {
        assert_eq!(
            entry,
            ConntrackEntry {
                nat_addr: [10, 244, 1, 7],
                nat_port: 8080u16.to_be_bytes(),
                kind: CT_FORWARD,
                flags: CT_STATEFUL | CT_SEEN,
                client_ipv4: [10, 244, 1, 9],
                service_id: 7,
                last_seen_ns,
                seq_end: 0,
                ack: 0,
            },
            "{key:?}: converted field by field, no sequence numbers"
        );
    }
    assert!(node.agent_log().contains("converted from layout v2"), "{}", node.agent_log());
}

/// Layout v3's conntrack (the same 32 bytes, `seq_after_syn` where v4
/// has `seq_end`) is converted into v4: every connection kept, its
/// acknowledgement too, its data end not known (a v3 value is the
/// initial sequence number + 1, stale for any connection that sent data).
#[test]
fn conntrack_of_layout_v3_is_converted_with_no_data_ends() {
    require_root!();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    std::fs::create_dir_all(maps_dir(&node)).unwrap();
    let pin = maps_dir(&node).join("conntrack-v3");
    let (key_size, value_size) = (size_of::<ConntrackKey>() as u32, size_of::<ConntrackEntry>() as u32);
    bpftool_create(&pin, "hash", key_size, value_size, 131_072, "CONNTRACK");
    let last_seen_ns = monotonic_now_ns();
    let v3 = |i: u16| ConntrackEntry {
        nat_addr: [10, 244, 1, 7],
        nat_port: 8080u16.to_be_bytes(),
        kind: CT_FORWARD,
        flags: CT_STATEFUL | CT_SEEN,
        client_ipv4: [10, 244, 1, 9],
        service_id: 7,
        last_seen_ns,
        seq_end: 0x1000_0001 + u32::from(i),
        ack: 0x2000_0000 + u32::from(i),
    };
    let key = |i: u16| ConntrackKey {
        saddr: [10, 244, 1, 9],
        daddr: WEB_VIP.octets(),
        sport: (40_000 + i).to_be_bytes(),
        dport: 80u16.to_be_bytes(),
        protocol: 6,
        _pad: [0; 3],
    };
    {
        let mut map: HashMap<MapData, ConntrackKey, ConntrackEntry> =
            HashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap())).unwrap();
        for i in 0..100 {
            map.insert(key(i), v3(i), 0).unwrap();
        }
    }
    node.start_agent();
    assert!(!pin.exists(), "the v3 pin is replaced");
    let v4 = maps_dir(&node).join("conntrack-v4");
    let map: HashMap<MapData, ConntrackKey, ConntrackEntry> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(&v4).unwrap())).unwrap();
    for i in 0..100 {
        assert_eq!(map.get(&key(i), 0).unwrap(), ConntrackEntry { seq_end: 0, ..v3(i) }, "connection {i}");
    }
    assert_eq!(map.keys().count(), 100);
    assert!(node.agent_log().contains("converted from layout v3"), "{}", node.agent_log());
}

/// A `[[services]]` entry: TCP port 80 -> `WEB_PORT` on `backends`.
fn web_service(backends: &[Ipv4Addr]) -> String {
    let list: Vec<String> = backends.iter().map(|ip| format!("\"{ip}\"")).collect();
    format!(
        "\n[[services]]\nname = \"web\"\ncluster_ip = \"{WEB_VIP}\"\nbackends = [{}]\n\
         [[services.ports]]\nport = 80\ntarget_port = {WEB_PORT}\n",
        list.join(", ")
    )
}

#[test]
fn growing_conntrack_keeps_service_connections_without_a_lost_packet() {
    require_root!();
    let fabric = Fabric::new();
    let (mut a, b) = peered_nodes(&fabric, "native");
    let client = a.add_pod("a1");
    let local = a.add_pod("a2");
    let remote = b.add_pod("b1");
    // The Service leads to a2; the stream from a1 goes through it.
    a.stop_agent();
    a.set_extra_config(&format!("conntrack_max_entries = 4096\n{}", web_service(&[local.ip])));
    a.start_agent();
    let conntrack = maps_dir(&a).join("conntrack-v4");
    assert_eq!(max_entries(&conntrack), 4096);
    let stream = Stream::start_via(&local.netns, (local.ip, WEB_PORT), &client.netns, Some((WEB_VIP, 80)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.inspect("conntrack").as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the stream's connection is not tracked");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tracked_before = a.inspect("conntrack");
    // The Service now leads to b1 only, which listens on nothing: the
    // stream keeps going to a2 only through its tracked connection. If that
    // were lost in the upgrade below, the stream's next packet would be a
    // new connection to b1, and be reset.
    a.set_extra_config(&format!("conntrack_max_entries = 4096\n{}", web_service(&[remote.ip])));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.inspect("services").to_string().contains(&format!("\"ip\":\"{}\"", remote.ip))
        || a.inspect("services").to_string().contains(&format!("\"ip\":\"{}\"", local.ip))
    {
        assert!(Instant::now() < deadline, "the Service change was not applied: {}", a.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }

    let cross = ping_flood(&client.netns, remote.ip, 1000);
    let same_node = ping_flood(&local.netns, client.ip, 1000);
    std::thread::sleep(Duration::from_millis(700));
    // The upgrade: a bigger connection-tracking map.
    a.kill_agent();
    a.set_extra_config(&format!("conntrack_max_entries = 8192\n{}", web_service(&[remote.ip])));
    let restart = Instant::now();
    a.start_agent();
    let restarted_in = restart.elapsed();
    let (cross_tx, cross_rx) = ping_result(cross);
    let (local_tx, local_rx) = ping_result(same_node);
    let tracked_after = a.inspect("conntrack");
    let (stall, bytes) = stream.finish();
    eprintln!(
        "conntrack 4096 -> 8192 entries, agent up again in {restarted_in:?}: cross-node pings \
         {cross_rx}/{cross_tx}, same-node pings {local_rx}/{local_tx}, Service TCP stream {} KiB with \
         longest gap {stall:?}",
        bytes >> 10
    );
    assert_eq!(max_entries(&conntrack), 8192, "the map grew");
    assert_eq!(cross_rx, cross_tx, "cross-node pings lost");
    assert_eq!(local_rx, local_tx, "same-node pings lost");
    assert!(stall < Duration::from_millis(500), "the Service stream stalled for {stall:?}");
    // Still tracked to a2, although the Service now says b1.
    let backend_of = |tracked: &serde_json::Value| -> Vec<String> {
        let mut backends: Vec<String> = tracked
            .as_array()
            .unwrap()
            .iter()
            .map(|c| format!("{}:{}", c["backend_ip"], c["backend_port"]))
            .collect();
        backends.sort();
        backends.dedup();
        backends
    };
    assert_eq!(backend_of(&tracked_before), vec![format!("\"{}\":{WEB_PORT}", local.ip)]);
    assert_eq!(backend_of(&tracked_after), backend_of(&tracked_before), "{tracked_after:#}");
    let log = a.agent_log();
    assert!(log.contains("map migrated") && log.contains("CONNTRACK"), "{log}");
    assert_eq!(pins(&a).iter().filter(|p| p.starts_with("conntrack-")).count(), 1, "{:?}", pins(&a));
}
