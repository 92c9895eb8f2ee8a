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
    if !require_root("check_passes_then_names_what_broke") {
        return;
    }
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
    if !require_root("add_twice_returns_the_same_result_and_makes_nothing") {
        return;
    }
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
    if !require_root("gc_removes_everything_not_in_valid_attachments") {
        return;
    }
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
    }
    assert!(ping(&node.netns, keep.ip, 1), "the valid pod still works");
}

#[test]
fn k8s_pod_names_reach_inspect_and_all_versions_work() {
    if !require_root("k8s_pod_names_reach_inspect_and_all_versions_work") {
        return;
    }
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
    if !require_root("gc_without_valid_attachments_or_before_1_1_removes_nothing") {
        return;
    }
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
