//! `datapath-cni`: CNI plugin binary. Config on stdin, CNI_* in the
//! environment, result or error JSON on stdout, exit status 1 on error.

use std::io::Read as _;

fn main() {
    use datapath_api::build_info::LONG_VERSION;
    // Runtimes pass no arguments (CNI is environment and stdin); an
    // operator asks which build is installed.
    if std::env::args().nth(1).as_deref() == Some("--version") && std::env::var_os("CNI_COMMAND").is_none() {
        println!("datapath-cni {LONG_VERSION}");
        return;
    }
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => datapath_cni::invoke(|k| std::env::var(k).ok(), &stdin),
        Err(e) => datapath_cni::Outcome {
            stdout: datapath_cni::error::CniError::with_source(
                datapath_cni::error::ErrorCode::IoFailure,
                "cannot read the network configuration from stdin",
                &e,
            )
            .to_json("1.1.0"),
            success: false,
        },
    };
    if !outcome.stdout.is_null() {
        println!("{}", outcome.stdout);
    }
    if !outcome.success {
        // The runtime logs a failing plugin's stderr with its error: which
        // build answered (the VERSION answer itself is the spec's).
        let command = std::env::var("CNI_COMMAND").ok().filter(|c| !c.is_empty());
        let command = command.as_deref().unwrap_or("a call without CNI_COMMAND");
        eprintln!("datapath-cni {LONG_VERSION}: {command} failed: {}", outcome.stdout);
    }
    std::process::exit(if outcome.success { 0 } else { 1 });
}
