//! Records the git commit built (`DATAPATH_GIT_COMMIT`) for [`build_info`]:
//! both binaries name it in `--version`.

/// The commit built, for `--version`, the start log and `pod_datapath_build_info`
/// (`DATAPATH_GIT_COMMIT`): from git where the source is a checkout (rerun
/// when HEAD moves: a commit relinks the agent), else as the image build
/// passes it, else "unknown".
fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-env-changed=DATAPATH_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&manifest_dir)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
                let dir = std::path::PathBuf::from(dir);
                println!("cargo:rerun-if-changed={}", dir.join("HEAD").display());
                if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
                    println!("cargo:rerun-if-changed={}", dir.join(head_ref).display());
                }
                let packed = dir.join("packed-refs");
                if packed.exists() {
                    println!("cargo:rerun-if-changed={}", packed.display());
                }
            }
            commit
        }
        None => std::env::var("DATAPATH_GIT_COMMIT").unwrap_or_else(|_| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=DATAPATH_GIT_COMMIT={commit}");
}
