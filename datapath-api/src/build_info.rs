//! What was built: the version, the git commit (`build.rs`) and the build
//! profile, for both binaries' `--version`, the agent's start log and the
//! `pod_datapath_build_info` metric, and the CNI plugin's failure lines.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_COMMIT: &str = env!("DATAPATH_GIT_COMMIT");

#[cfg(debug_assertions)]
pub const PROFILE: &str = "debug";
#[cfg(not(debug_assertions))]
pub const PROFILE: &str = "release";

/// `--version`'s text: "0.1.0 (commit 0123456789ab, release build)".
#[cfg(debug_assertions)]
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DATAPATH_GIT_COMMIT"), ", debug build)");
#[cfg(not(debug_assertions))]
pub const LONG_VERSION: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("DATAPATH_GIT_COMMIT"), ", release build)");
