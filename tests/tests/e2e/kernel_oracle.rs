//! Differential test with the kernel as the oracle: the corpus of frames in
//! `datapath_tests::oracle` goes through our datapath and through the same
//! topology forwarded by the plain kernel (flannel-style, `rp_filter=1`),
//! from a pod, a pod on the other node, the peer node, an outside host on
//! the fabric, and as tunnelled frames from both. Per frame, what our
//! datapath delivers must be a subset of what the kernel delivers (up to
//! the intended differences below, each with its reason), and every frame
//! we do not deliver must be counted under a named reason.

use std::collections::BTreeMap;

use datapath_tests::{
    oracle::{Class, Kernel, Ours, Outcome, Sender, corpus, run_corpus},
    require_root,
};

/// Where our datapath delivers what the kernel would not, on purpose.
/// (class, sender, why). Documented in docs/why-dropped.md.
const MORE_PERMISSIVE_ON_PURPOSE: &[(&str, Sender, &str)] = &[
    (
        "dst MAC of another host",
        Sender::PeerTunnel,
        "the inner MACs of a tunnelled frame are the sending node's choice: the peer is authenticated by its \
         outer address and the inner source by its pod CIDR; a kernel VXLAN device drops an inner frame not \
         addressed to its own MAC",
    ),
    ("dst MAC broadcast", Sender::PeerTunnel, "as above: inner MACs are not checked"),
    ("dst MAC multicast", Sender::PeerTunnel, "as above: inner MACs are not checked"),
];

fn verdict(o: &Outcome) -> String {
    let mut v = if o.delivered { "delivered".to_owned() } else { "-".to_owned() };
    if let Some((t, c, from)) = o.answered {
        v.push_str(&format!(" +icmp {t}/{c} from {from}"));
    }
    v
}

fn differential(mode: &str) {
    let classes = corpus();
    let senders: Vec<Sender> = Sender::ALL.to_vec();
    let ours = Ours::new(mode);
    let pod_ips = ours.pod_ips();
    let our_outcomes = run_corpus(&ours, &classes, &senders);
    drop(ours);
    let kernel = Kernel::new(mode, &pod_ips);
    let kernel_outcomes = run_corpus(&kernel, &classes, &senders);
    drop(kernel);

    let mut failures = Vec::new();
    let mut table = format!(
        "\n{mode} mode: class x sender, ours vs the plain kernel\n{:<44} {:<20} {:<40} {:<40} {}\n",
        "class", "sender", "ours", "kernel", "ours counted"
    );
    let mut stricter = BTreeMap::new();
    for ((c, sender), ours) in &our_outcomes {
        let class: &Class = &classes[*c];
        let kernel = &kernel_outcomes[&(*c, *sender)];
        table.push_str(&format!(
            "{:<44} {:<20} {:<40} {:<40} {}\n",
            class.name,
            sender.name(),
            verdict(ours),
            verdict(kernel),
            ours.counted.join(",")
        ));
        if ours.delivered && !kernel.delivered {
            let intended = MORE_PERMISSIVE_ON_PURPOSE.iter().any(|(n, s, _)| *n == class.name && s == sender);
            if !intended {
                failures.push(format!(
                    "{} from {}: we deliver, the kernel does not",
                    class.name,
                    sender.name()
                ));
            }
        }
        if !ours.delivered && kernel.delivered {
            *stricter.entry(class.name).or_insert(0) += 1;
        }
        if !ours.delivered && !class.before_programs && !ours.accounted {
            failures.push(format!(
                "{} from {}: not delivered and counted under no reason",
                class.name,
                sender.name()
            ));
        }
        // A router answers an expiring TTL and a DF packet too big for the
        // next hop: where the kernel does, we do (other ICMP errors, e.g.
        // the kernel's port unreachable for tunnel probes, aside).
        let router_answer = |o: &Outcome| {
            o.answered.map(|(t, c, _)| (t, c)).filter(|answer| matches!(answer, (11, 0) | (3, 4)))
        };
        if router_answer(kernel) != router_answer(ours) {
            let stricter_before = *sender == Sender::OutsideTunnel;
            if !stricter_before {
                failures.push(format!(
                    "{} from {}: kernel answered {:?}, ours {:?}",
                    class.name,
                    sender.name(),
                    kernel.answered,
                    ours.answered
                ));
            }
        }
    }
    // The corpus must exercise both outcomes, or the comparison says nothing.
    let delivered = our_outcomes.values().filter(|o| o.delivered).count();
    let refused = our_outcomes.len() - delivered;
    table.push_str(&format!(
        "{} probes: we delivered {delivered} and refused {refused}; stricter than the kernel in: {stricter:?}\n",
        our_outcomes.len()
    ));
    println!("{table}");
    assert!(delivered > 20 && refused > 50, "the corpus did not exercise both outcomes");
    assert!(
        failures.is_empty(),
        "{} differences from the kernel:\n{}\n{table}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn native_mode_delivers_no_more_than_the_kernel() {
    require_root!();
    differential("native");
}

#[test]
fn vxlan_mode_delivers_no_more_than_the_kernel() {
    require_root!();
    differential("vxlan");
}
