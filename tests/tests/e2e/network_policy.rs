//! NetworkPolicy, enforced by the programs: upstream's conformance cases
//! (test/e2e/network/netpol, transcribed in `netpol_cases`) run whole, their
//! truth tables compared cell by cell, on two nodes in both modes.

use datapath_tests::{
    in_both_modes,
    netpol::{PolicyLab, sctp_available},
    netpol_cases::{CASES, Protocol, truth_table},
};

in_both_modes! {
    upstream_conformance => upstream_conformance;
}

fn upstream_conformance(mode: &str) {
    let started = std::time::Instant::now();
    let mut lab = PolicyLab::new(mode);
    eprintln!("lab ready in {:.1}s", started.elapsed().as_secs_f64());
    let sctp = sctp_available();
    let (mut cases, mut cells) = (0, 0);
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    // To run some cases only while debugging: a part of their names.
    let only = std::env::var("DATAPATH_NETPOL_CASES").ok();
    for case in CASES {
        if only.as_ref().is_some_and(|only| !case.name.contains(only.as_str())) {
            continue;
        }
        if let Some(reason) = case.skip {
            skipped.push(format!("{}: {reason}", case.name));
            continue;
        }
        let uses_sctp = case.steps.iter().any(|s| s.probes.iter().any(|(p, _)| *p == Protocol::Sctp));
        if uses_sctp && !sctp {
            skipped.push(format!("{} (SCTP): this kernel has no SCTP (CONFIG_IP_SCTP unset)", case.name));
            continue;
        }
        let started = std::time::Instant::now();
        // Each case starts from no policy: wait until every pod reaches
        // every pod, so a table the last case left cannot pass for this one's.
        lab.reset();
        if let Err(table) = lab.expect(Protocol::Tcp, 80, &[[true; 9]; 9]) {
            failures.push(format!("{}: no policy, yet:\n{table}", case.name));
            continue;
        }
        let mut failed = false;
        for (index, step) in case.steps.iter().enumerate() {
            lab.apply(step);
            let want = truth_table(step);
            for (protocol, port) in step.probes {
                match lab.expect(*protocol, *port, &want) {
                    Ok(compared) => cells += compared,
                    Err(table) => {
                        failures.push(format!("{} (step {index}):\n{table}", case.name));
                        failed = true;
                    }
                }
            }
            if failed {
                break;
            }
        }
        cases += usize::from(!failed);
        eprintln!(
            "{:>6.1}s {} {}",
            started.elapsed().as_secs_f64(),
            if failed { "FAIL" } else { "ok  " },
            case.name
        );
    }
    println!(
        "netpol conformance ({mode}): {cases} of {} cases passed, {cells} cells compared, {} skipped",
        CASES.len(),
        skipped.len()
    );
    for skip in &skipped {
        println!("  skipped: {skip}");
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}
