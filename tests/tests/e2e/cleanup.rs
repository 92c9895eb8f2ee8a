//! `datapath-agent cleanup` (uninstall): refused while an agent holds the
//! node; once it stopped, removes what the agent made (pins, and with them
//! the programs on the veths and the uplink; routes of protocol 217; the
//! masquerade table; the VXLAN device; the CNI config and plugin; the
//! state) and nothing else; a second run finds nothing.

use std::{net::Ipv4Addr, path::Path, process::Output};

use datapath_tests::{
    bin_dir,
    lab::{Fabric, Node, ping},
    require_root,
};

fn cleanup(node: &Node, cni_bin_dir: &Path, force: bool) -> Output {
    let mut cmd = node.in_node(&bin_dir().join("datapath-agent"));
    cmd.arg("cleanup").arg("--config").arg(node.config_path()).arg("--cni-bin-dir").arg(cni_bin_dir);
    if force {
        cmd.arg("--force");
    }
    cmd.output().unwrap()
}

/// The IDs of the links pinned under `dir` (TCX on the uplink and the
/// pods' veths, the socket programs' cgroup links), found by walking it.
fn pinned_link_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let out = std::process::Command::new("bpftool")
                .args(["-j", "link", "show", "pinned"])
                .arg(&path)
                .output()
                .unwrap();
            // Maps and programs are pinned too: only links answer.
            if let Ok(link) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                && let Some(id) = link["id"].as_u64()
                && link.get("prog_id").is_some()
            {
                ids.push(id);
            }
        }
    }
    ids
}

/// Whether the kernel still has link `id` (a detached link is gone).
fn link_exists(id: u64) -> bool {
    std::process::Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

/// What of the agent's making is on the node now (each "what: yes/no").
fn left(node: &Node, cni_bin_dir: &Path) -> Vec<(&'static str, bool)> {
    let ns = &node.netns;
    vec![
        ("pins", node.bpffs_dir.exists()),
        ("state", node.work_dir.join("state").exists()),
        ("CNI config", node.written_cni_config().exists()),
        ("CNI plugin", cni_bin_dir.join("datapath-cni").exists()),
        ("routes of protocol 217", !ns.exec(&["ip", "route", "show", "proto", "217"]).trim().is_empty()),
        ("masquerade table", ns.exec_ok(&["nft", "list", "table", "ip", "datapath"])),
        ("VXLAN device", ns.exec_ok(&["ip", "link", "show", "dp-vxlan"])),
    ]
}

#[test]
fn cleanup_removes_what_the_agent_made_and_nothing_else() {
    require_root!();
    let fabric = Fabric::new();
    let mut a = Node::on_fabric(&fabric, "10.244.1.0/24", Ipv4Addr::new(10, 250, 0, 1), "vxlan");
    let mut b = Node::on_fabric(&fabric, "10.244.2.0/24", Ipv4Addr::new(10, 250, 0, 2), "vxlan");
    a.set_extra_config(&format!(
        "masquerade = true\ncni_config_file = \"{}\"\n",
        a.written_cni_config().display()
    ));
    a.set_peers(vec![b.as_peer()]);
    b.set_peers(vec![a.as_peer()]);
    a.start_agent();
    b.start_agent();
    // The plugin as the DaemonSet installs it, next to another CNI's.
    let cni_bin_dir = a.work_dir.join("cni-bin");
    std::fs::create_dir_all(&cni_bin_dir).unwrap();
    std::fs::copy(bin_dir().join("datapath-cni"), cni_bin_dir.join("datapath-cni")).unwrap();
    std::fs::write(cni_bin_dir.join("host-local"), b"another plugin").unwrap();
    let other_conf = a.written_cni_config().with_file_name("99-other.conflist");
    let pod = a.add_pod("p");
    let remote = b.add_pod("q");
    assert!(ping(&pod.netns, remote.ip, 1), "control: across nodes");
    datapath_tests::wait_for("the CNI config written", std::time::Duration::from_secs(10), || {
        a.written_cni_config().exists()
    });
    std::fs::write(&other_conf, b"{\"cniVersion\": \"1.0.0\", \"name\": \"other\", \"plugins\": []}")
        .unwrap();
    let made = left(&a, &cni_bin_dir);
    assert!(made.iter().all(|(_, there)| *there), "the agent made all of it: {made:?}");
    let links = pinned_link_ids(&a.bpffs_dir);
    assert!(links.len() >= 3, "the uplink's, the VXLAN device's and the pod's links at least: {links:?}");

    // Refused while the agent runs: nothing removed, pods still served.
    let out = cleanup(&a, &cni_bin_dir, false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("stop it first"), "{out:?}");
    assert_eq!(left(&a, &cni_bin_dir), made, "nothing removed under a running agent");
    assert!(ping(&pod.netns, remote.ip, 1), "still forwarding");

    a.stop_agent();
    let out = cleanup(&a, &cni_bin_dir, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    eprintln!("{stdout}");
    let after = left(&a, &cni_bin_dir);
    assert!(after.iter().all(|(_, there)| !*there), "left behind: {after:?}\n{stdout}");
    let attached: Vec<u64> = links.into_iter().filter(|id| link_exists(*id)).collect();
    assert_eq!(attached, Vec::<u64>::new(), "links still attached after their pins went");
    // Nothing else: the other CNI's config and plugin, the pod's veth, the
    // uplink's address, the peer node.
    assert!(other_conf.exists() && cni_bin_dir.join("host-local").exists());
    assert!(a.host_veths().contains(&pod.host_veth), "the pod's veth is the pod's");
    assert!(a.netns.exec(&["ip", "addr", "show", "dptup0"]).contains("10.250.0.1/24"));
    assert!(b.bpffs_dir.exists() && b.agent_running(), "the other node untouched");

    // Again: nothing to do, success.
    let out = cleanup(&a, &cni_bin_dir, false);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing of the datapath left"), "{out:?}");

    // Another CNI's config at our path is not ours: left alone.
    std::fs::write(a.written_cni_config(), b"{\"plugins\": [{\"type\": \"bridge\"}]}").unwrap();
    let out = cleanup(&a, &cni_bin_dir, false);
    assert!(out.status.success() && a.written_cni_config().exists(), "{out:?}");
}
