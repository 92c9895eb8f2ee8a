//! The rest of the CNI verbs: CHECK finds what is wrong, ADD twice is
//! harmless, GC removes what the runtime no longer wants, the K8S_POD_*
//! arguments reach `inspect`, and every supported cniVersion works.

use std::net::Ipv4Addr;

use datapath_tests::{
    lab::{Netns, Node, Pod, ping},
    require_root, sh,
};

fn node() -> Node {
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1));
    node.start_agent();
    node
}

fn check(node: &Node, pod: &Pod) -> datapath_tests::lab::CniRun {
    let mut conf = node.cni_config();
    conf["prevResult"] = pod.result.clone();
    let netns = pod.netns.path().display().to_string();
    node.cni(&Node::cni_env("CHECK", &pod.container_id, &netns), conf.to_string().as_bytes())
}

#[test]
fn check_passes_then_names_what_broke() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let run = check(&node, &a);
    assert!(run.success, "CHECK of a fresh pod: {}", run.raw_stdout);

    // Without prevResult CHECK cannot know what to compare with.
    let netns = a.netns.path().display().to_string();
    let bare =
        node.cni(&Node::cni_env("CHECK", &a.container_id, &netns), node.cni_config().to_string().as_bytes());
    assert_eq!(bare.stdout["code"].as_u64(), Some(7), "{}", bare.raw_stdout);

    // Break the pod's address and the node's route: CHECK names both.
    sh(&["ip", "-n", &a.netns.name, "addr", "del", &format!("{}/32", a.ip), "dev", "eth0"]);
    sh(&["ip", "-n", &node.netns.name, "route", "del", &format!("{}/32", a.ip)]);
    let run = check(&node, &a);
    assert!(!run.success);
    assert_eq!(run.stdout["code"].as_u64(), Some(100), "{}", run.raw_stdout);
    let msg = run.stdout["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("eth0 lacks {}/32", a.ip)), "{msg}");
    assert!(msg.contains(&format!("no route to {}", a.ip)), "{msg}");
    assert!(msg.contains("default route"), "the default route went with the address: {msg}");

    // A pod whose veth is gone: CHECK says so, and that the agent lost it too.
    let b = node.add_pod("b");
    sh(&["ip", "-n", &node.netns.name, "link", "del", &b.host_veth]);
    let run = check(&node, &b);
    let msg = run.stdout["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("is missing"), "{}", run.raw_stdout);
}

#[test]
fn add_twice_returns_the_same_result_and_makes_nothing() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let netns = a.netns.path().display().to_string();
    let again =
        node.cni(&Node::cni_env("ADD", &a.container_id, &netns), node.cni_config().to_string().as_bytes());
    assert!(again.success, "{}", again.raw_stdout);
    assert_eq!(again.stdout["ips"], a.result["ips"]);
    assert_eq!(again.stdout["interfaces"], a.result["interfaces"]);
    assert_eq!(node.host_veths(), vec![a.host_veth.clone()]);
    assert_eq!(node.ipam_leases(), vec![a.ip.to_string()]);
    assert_eq!(node.inspect("endpoints").as_array().unwrap().len(), 1);
    assert!(ping(&node.netns, a.ip, 1));
}

#[test]
fn gc_removes_everything_not_in_valid_attachments() {
    require_root!();
    let node = node();
    let keep = node.add_pod("keep");
    let gone1 = node.add_pod("gone1");
    let gone2 = node.add_pod("gone2");
    // An orphan veth with our name pattern and no owner (an ADD killed half-way).
    sh(&[
        "ip",
        "-n",
        &node.netns.name,
        "link",
        "add",
        "dpt0123456789ab",
        "type",
        "veth",
        "peer",
        "name",
        "dptorphan",
    ]);

    let mut conf = node.cni_config();
    conf["cniVersion"] = "1.1.0".into();
    conf["cni.dev/valid-attachments"] =
        serde_json::json!([{ "containerID": keep.container_id, "ifname": "eth0" }]);
    let run = node.cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert!(run.success, "GC: {}", run.raw_stdout);

    assert_eq!(node.host_veths(), vec![keep.host_veth.clone()], "only the valid attachment's veth stays");
    assert_eq!(node.ipam_leases(), vec![keep.ip.to_string()]);
    let endpoints = node.inspect("endpoints");
    let ips: Vec<&str> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap()).collect();
    assert_eq!(ips, vec![keep.ip.to_string()]);
    for pod in [&gone1, &gone2] {
        assert!(!node.bpffs_dir.join("links").join(&pod.host_veth).exists());
        assert!(!node.bpffs_dir.join("to-pod-links").join(&pod.host_veth).exists());
    }
    assert!(ping(&node.netns, keep.ip, 1), "the valid pod still works");
}

#[test]
fn k8s_pod_names_reach_inspect_and_all_versions_work() {
    require_root!();
    let node = node();
    for (i, version) in ["0.4.0", "1.0.0", "1.1.0"].iter().enumerate() {
        let ns = Netns::new(format!("{}-v{i}", node.id));
        let mut conf = node.cni_config();
        conf["cniVersion"] = (*version).into();
        let container = format!("version-{i}");
        let netns = ns.path().display().to_string();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-{i};K8S_POD_NAME=web-{i};K8S_POD_UID=uid-{i};K8S_POD_INFRA_CONTAINER_ID={container}"
        );
        let mut env = Node::cni_env("ADD", &container, &netns);
        env.retain(|(k, _)| *k != "CNI_ARGS");
        env.push(("CNI_ARGS", &args));
        let run = node.cni(&env, conf.to_string().as_bytes());
        assert!(run.success, "ADD with {version}: {}", run.raw_stdout);
        assert_eq!(run.stdout["cniVersion"], *version);
        if *version == "0.4.0" {
            assert_eq!(run.stdout["ips"][0]["version"], "4", "0.4.0 results carry the IP version");
        }
        let ip = run.stdout["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").to_owned();
        let endpoints = node.inspect("endpoints");
        let row = endpoints.as_array().unwrap().iter().find(|e| e["pod_ip"] == ip.as_str()).unwrap().clone();
        assert_eq!(row["pod"], format!("team-{i}/web-{i}"), "{row}");
        assert_eq!(row["container_id"], container.as_str());
        let mut del_conf = conf.clone();
        del_conf["prevResult"] = run.stdout.clone();
        let mut env = Node::cni_env("DEL", &container, &netns);
        env.retain(|(k, _)| *k != "CNI_ARGS");
        assert!(node.cni(&env, del_conf.to_string().as_bytes()).success);
    }
    assert_eq!(node.inspect("endpoints"), serde_json::json!([]));
}

/// Everything `pods` were given is still in place, and they answer.
#[track_caller]
fn assert_pods_intact(node: &Node, pods: &[&Pod]) {
    let mut veths = node.host_veths();
    veths.sort();
    let mut want: Vec<String> = pods.iter().map(|p| p.host_veth.clone()).collect();
    want.extend([ORPHAN_VETH.to_owned(), "dptorphan".to_owned()]);
    want.sort();
    assert_eq!(veths, want, "host veths (and the orphan-looking one) kept");
    let mut leases = node.ipam_leases();
    leases.sort();
    let mut ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();
    ips.sort();
    assert_eq!(leases, ips, "leases kept");
    let endpoints = node.inspect("endpoints");
    let mut programmed: Vec<String> =
        endpoints.as_array().unwrap().iter().map(|e| e["pod_ip"].as_str().unwrap().to_owned()).collect();
    programmed.sort();
    assert_eq!(programmed, ips, "map entries kept");
    for pod in pods {
        assert!(node.bpffs_dir.join("links").join(&pod.host_veth).exists(), "link pin of {}", pod.host_veth);
        assert!(node.bpffs_dir.join("to-pod-links").join(&pod.host_veth).exists(), "{}", pod.host_veth);
        assert!(
            node.work_dir.join("state/endpoints").join(format!("{}.json", pod.host_veth)).exists(),
            "record of {}",
            pod.host_veth
        );
        assert!(ping(&node.netns, pod.ip, 1), "{} still answers", pod.ip);
    }
}

const ORPHAN_VETH: &str = "dpt0123456789ab";

#[test]
fn gc_without_valid_attachments_or_before_1_1_removes_nothing() {
    require_root!();
    let node = node();
    let a = node.add_pod("a");
    let b = node.add_pod("b");
    // A veth with our name pattern and no owner: a GC that runs would remove it.
    sh(&[
        "ip",
        "-n",
        &node.netns.name,
        "link",
        "add",
        ORPHAN_VETH,
        "type",
        "veth",
        "peer",
        "name",
        "dptorphan",
    ]);
    let only_a = serde_json::json!([{ "containerID": a.container_id, "ifname": "eth0" }]);
    let refused = |version: &str, attachments: Option<serde_json::Value>, code: u64, msg: &str| {
        let mut conf = node.cni_config();
        conf["cniVersion"] = version.into();
        if let Some(list) = attachments {
            conf["cni.dev/valid-attachments"] = list;
        }
        let run = node.cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
        assert!(!run.success, "GC {version} must be refused: {}", run.raw_stdout);
        assert_eq!(run.stdout["code"].as_u64(), Some(code), "{}", run.raw_stdout);
        let text = run.stdout["msg"].as_str().unwrap_or_default();
        assert!(text.contains(msg), "msg {text:?} lacks {msg:?}");
        assert_pods_intact(&node, &[&a, &b]);
    };
    // The reproduction: the normal config (1.0.0, no list) as GC.
    refused("1.0.0", None, 1, "1.1.0");
    // GC is a 1.1.0 verb: an older config is refused even with a list.
    refused("1.0.0", Some(only_a.clone()), 1, "1.1.0");
    refused("0.4.0", Some(only_a.clone()), 1, "1.1.0");
    // 1.1.0 without the list, or with null: the runtime named nothing as valid
    // on purpose, so nothing is removed.
    refused("1.1.0", None, 7, "cni.dev/valid-attachments");
    refused("1.1.0", Some(serde_json::Value::Null), 7, "cni.dev/valid-attachments");
    refused(
        "1.1.0",
        Some(serde_json::json!({ "containerID": a.container_id })),
        7,
        "cni.dev/valid-attachments",
    );
    refused(
        "1.1.0",
        Some(serde_json::json!([{ "containerID": a.container_id }])),
        7,
        "cni.dev/valid-attachments",
    );

    // An explicit list still works: b goes, a stays.
    let mut conf = node.cni_config();
    conf["cniVersion"] = "1.1.0".into();
    conf["cni.dev/valid-attachments"] = only_a;
    let run = node.cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes());
    assert!(run.success, "GC: {}", run.raw_stdout);
    assert_eq!(node.host_veths(), vec![a.host_veth.clone()]);
    assert_eq!(node.ipam_leases(), vec![a.ip.to_string()]);
}

/// A second network on the node (another conflist, or multus): the same
/// plugin and agent, its own name, so its own host-local leases
/// (`<dataDir>/<name>/`), and addresses from .200 up.
const SECOND_NETWORK: &str = "datapath-test2";

fn second_network_config(node: &Node) -> serde_json::Value {
    let mut conf = node.cni_config();
    conf["name"] = SECOND_NETWORK.into();
    conf["ipam"]["ranges"] = serde_json::json!([[{ "subnet": node.pod_cidr, "rangeStart": "10.244.1.200" }]]);
    conf
}

fn second_network_leases(node: &Node) -> Vec<String> {
    let mut leases: Vec<String> = std::fs::read_dir(node.work_dir.join("ipam").join(SECOND_NETWORK))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    leases.sort();
    leases
}

/// One interface of a pod on one network.
struct Attachment {
    ip: Ipv4Addr,
    host_veth: String,
}

/// ADD `container` (namespace `netns`) as `ifname` with `conf`.
fn attach(node: &Node, conf: &serde_json::Value, container: &str, netns: &Netns, ifname: &str) -> Attachment {
    let path = netns.path().display().to_string();
    let mut env = Node::cni_env("ADD", container, &path);
    env.retain(|(k, _)| *k != "CNI_IFNAME");
    env.push(("CNI_IFNAME", ifname));
    let run = node.cni(&env, conf.to_string().as_bytes());
    assert!(run.success, "ADD {container} {ifname}: {}\n{}", run.raw_stdout, node.agent_log());
    let ip: Ipv4Addr =
        run.stdout["ips"][0]["address"].as_str().unwrap().trim_end_matches("/32").parse().unwrap();
    let host_veth = run.stdout["interfaces"][0]["name"].as_str().unwrap().to_owned();
    Attachment { ip, host_veth }
}

fn gc(node: &Node, conf: &serde_json::Value, valid: serde_json::Value) -> datapath_tests::lab::CniRun {
    let mut conf = conf.clone();
    conf["cniVersion"] = "1.1.0".into();
    conf["cni.dev/valid-attachments"] = valid;
    node.cni(&[("CNI_COMMAND", "GC")], conf.to_string().as_bytes())
}

/// The attachment is whole: veth, map entry, link pin, record, and it answers.
#[track_caller]
fn assert_attached(node: &Node, pod: &Attachment) {
    assert!(node.host_veths().contains(&pod.host_veth), "veth {} kept", pod.host_veth);
    let endpoints = node.inspect("endpoints");
    assert!(
        endpoints.as_array().unwrap().iter().any(|e| e["pod_ip"] == pod.ip.to_string().as_str()),
        "map entry of {} kept: {endpoints}",
        pod.ip
    );
    assert!(node.bpffs_dir.join("links").join(&pod.host_veth).exists(), "link pin of {}", pod.host_veth);
    assert!(
        node.work_dir.join("state/endpoints").join(format!("{}.json", pod.host_veth)).exists(),
        "record of {}",
        pod.host_veth
    );
    assert!(ping(&node.netns, pod.ip, 1), "{} still answers", pod.ip);
}

#[track_caller]
fn assert_detached(node: &Node, pod: &Attachment) {
    assert!(!node.host_veths().contains(&pod.host_veth), "veth {} removed", pod.host_veth);
    let endpoints = node.inspect("endpoints");
    assert!(
        !endpoints.as_array().unwrap().iter().any(|e| e["pod_ip"] == pod.ip.to_string().as_str()),
        "map entry of {} removed: {endpoints}",
        pod.ip
    );
    assert!(!node.bpffs_dir.join("links").join(&pod.host_veth).exists(), "link pin of {}", pod.host_veth);
    assert!(!node.work_dir.join("state/endpoints").join(format!("{}.json", pod.host_veth)).exists());
}

#[test]
fn gc_of_one_network_leaves_other_networks_alone() {
    require_root!();
    let node = node();
    let first = node.cni_config();
    let second = second_network_config(&node);
    // Two pods on each network. (One pod on both, as multus would make it,
    // is not possible: each ADD installs the pod's default route.)
    let namespaces: Vec<Netns> =
        ["a", "b", "c", "d"].iter().map(|n| Netns::new(format!("{}-{n}", node.id))).collect();
    let a = attach(&node, &first, "pod-a", &namespaces[0], "eth0");
    let b = attach(&node, &first, "pod-b", &namespaces[1], "eth0");
    let c = attach(&node, &second, "pod-c", &namespaces[2], "net1");
    let d = attach(&node, &second, "pod-d", &namespaces[3], "net1");
    assert!(c.ip.octets()[3] >= 200 && d.ip.octets()[3] >= 200, "second network's range");
    let second_leases = second_network_leases(&node);
    assert_eq!(second_leases.len(), 2);

    // The first network's runtime still uses a only.
    let run = gc(&node, &first, serde_json::json!([{ "containerID": "pod-a", "ifname": "eth0" }]));
    assert!(run.success, "GC: {}", run.raw_stdout);
    assert_attached(&node, &a);
    assert_detached(&node, &b);
    assert_eq!(node.ipam_leases(), vec![a.ip.to_string()], "b's lease released");
    for other in [&c, &d] {
        assert_attached(&node, other);
    }
    assert_eq!(second_network_leases(&node), second_leases, "the second network's leases kept");

    // The second network's GC keeps what its list names and removes the
    // rest, releasing that lease in its own IPAM store; the first network's
    // pod stays.
    let run = gc(&node, &second, serde_json::json!([{ "containerID": "pod-d", "ifname": "net1" }]));
    assert!(run.success, "GC: {}", run.raw_stdout);
    assert_detached(&node, &c);
    assert_attached(&node, &d);
    assert_attached(&node, &a);
    assert_eq!(second_network_leases(&node), vec![d.ip.to_string()]);
    assert_eq!(node.ipam_leases(), vec![a.ip.to_string()]);
}

#[test]
fn gc_keeps_endpoints_whose_record_names_no_network() {
    require_root!();
    let node = node();
    let old_pod = node.add_pod("old");
    let new_pod = node.add_pod("new");
    let [old, new] = [&old_pod, &new_pod].map(|p| Attachment { ip: p.ip, host_veth: p.host_veth.clone() });
    // A record as a plugin from before network names left it.
    let record_path = node.work_dir.join("state/endpoints").join(format!("{}.json", old.host_veth));
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    assert_eq!(record["network"], "datapath-test", "ADD records the network: {record}");
    record.as_object_mut().unwrap().remove("network");
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();

    let run = gc(&node, &node.cni_config(), serde_json::json!([]));
    assert!(run.success, "GC: {}", run.raw_stdout);
    assert_detached(&node, &new);
    assert_attached(&node, &old);
    assert!(
        run.stderr.contains(&old.host_veth) && run.stderr.contains("does not say which network"),
        "GC says why it kept {}: {}",
        old.host_veth,
        run.stderr
    );
    assert_eq!(node.ipam_leases(), vec![old.ip.to_string()]);
    // DEL still removes it.
    assert!(node.del_pod(&old_pod).success);
    assert_detached(&node, &old);
    assert_eq!(node.ipam_leases(), Vec::<String>::new());
}

#[test]
fn gc_sweeps_only_veths_never_a_bridge_named_like_one() {
    require_root!();
    let node = node();
    let keep_pod = node.add_pod("keep");
    let keep = Attachment { ip: keep_pod.ip, host_veth: keep_pod.host_veth.clone() };
    // Both named prefix + 12 hex digits, neither recorded: the veth is an
    // orphan of a killed ADD, the bridge is somebody else's device.
    let bridge = "dptabcdef012345";
    sh(&["ip", "-n", &node.netns.name, "link", "add", bridge, "type", "bridge"]);
    sh(&[
        "ip",
        "-n",
        &node.netns.name,
        "link",
        "add",
        ORPHAN_VETH,
        "type",
        "veth",
        "peer",
        "name",
        "dptorphan",
    ]);

    let run = gc(
        &node,
        &node.cni_config(),
        serde_json::json!([{ "containerID": keep_pod.container_id, "ifname": "eth0" }]),
    );
    assert!(run.success, "GC: {}", run.raw_stdout);
    let mut left = node.host_veths();
    left.sort();
    let mut want = vec![keep.host_veth.clone(), bridge.to_owned()];
    want.sort();
    assert_eq!(left, want, "the orphan veth went, the bridge stayed");
    assert!(sh(&["ip", "-n", &node.netns.name, "-d", "link", "show", bridge]).contains("bridge"));
    assert_attached(&node, &keep);
}
