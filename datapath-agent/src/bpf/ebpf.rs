//! The compiled eBPF objects, embedded at build time.

/// ELF bytes of the datapath programs, aligned for aya's loader.
pub static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath"));

/// The same programs built with aya-log calls on every verdict.
pub static DATAPATH_DEBUG_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath-debug"));

/// aya-log records from the debug build, re-emitted as `tracing` events
/// (target `datapath_ebpf`) so they land in the agent's structured log.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "datapath_ebpf", "{message}"),
            log::Level::Warn => tracing::warn!(target: "datapath_ebpf", "{message}"),
            log::Level::Info => tracing::info!(target: "datapath_ebpf", "{message}"),
            log::Level::Debug => tracing::debug!(target: "datapath_ebpf", "{message}"),
            log::Level::Trace => tracing::trace!(target: "datapath_ebpf", "{message}"),
        }
    }

    fn flush(&self) {}
}

/// Start reading the debug build's log ring buffer on the tokio runtime.
pub fn forward_log_to_tracing(ebpf: &mut aya::Ebpf) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracingLog).context("opening AYA_LOGS")?;
    // SAFETY: the AsyncFd owns the logger, whose ring buffer fd therefore
    // stays open for as long as it is registered.
    let mut logger =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .context("polling AYA_LOGS")?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = logger.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// CLOCK_MONOTONIC in ns: the clock of the programs' `bpf_ktime_get_ns` and
/// `bpf_ktime_get_coarse_ns` (the coarse variant lags by at most a tick).
pub fn monotonic_now_ns() -> nix::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}
