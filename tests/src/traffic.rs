//! Traffic that runs while the agent restarts or upgrades: a ping flood and
//! a paced TCP stream, each telling afterwards what got lost.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::lab::{Netns, in_netns};

/// A TCP stream from a client to a server; tells the longest gap between
/// two successful reads on the server side while it ran.
pub struct Stream {
    stop: Arc<AtomicBool>,
    server: std::thread::JoinHandle<anyhow::Result<(Duration, u64)>>,
    client: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Stream {
    /// `client` connects straight to a server on `server_ip` (any port) in `server`.
    pub fn start(server: &Netns, server_ip: Ipv4Addr, client: &Netns) -> Self {
        Self::start_via(server, (server_ip, 0), client, None)
    }

    /// The server listens on `listen` in `server`; `client` connects to
    /// `connect_to` (e.g. a Service address that leads to it), or to the
    /// server's own address when `None`.
    pub fn start_via(
        server: &Netns,
        listen: (Ipv4Addr, u16),
        client: &Netns,
        connect_to: Option<(Ipv4Addr, u16)>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let server = in_netns(&server.path(), move || -> anyhow::Result<(Duration, u64)> {
            let listener = TcpListener::bind(listen)?;
            tx.send(listener.local_addr()?.port())?;
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = vec![0u8; 1 << 16];
            let (mut last, mut longest, mut bytes) = (Instant::now(), Duration::ZERO, 0u64);
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    return Ok((longest, bytes));
                }
                bytes += n as u64;
                longest = longest.max(last.elapsed());
                last = Instant::now();
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let target = connect_to.unwrap_or((listen.0, port));
        let client_stop = Arc::clone(&stop);
        let client = in_netns(&client.path(), move || -> anyhow::Result<()> {
            let mut conn = TcpStream::connect(target)?;
            conn.set_write_timeout(Some(Duration::from_secs(5)))?;
            let chunk = vec![7u8; 16 << 10];
            while !client_stop.load(Ordering::Relaxed) {
                conn.write_all(&chunk)?;
                // Paced, so the stream is a steady flow rather than a hog.
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        Self { stop, server, client }
    }

    /// Stop the client; (longest gap, bytes received).
    pub fn finish(self) -> (Duration, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.client.join().unwrap().expect("TCP client");
        self.server.join().unwrap().expect("TCP server")
    }
}

/// `ping -i 0.005` in the background; [`ping_result`] tells what it lost.
pub fn ping_flood(from: &Netns, dst: Ipv4Addr, count: u32) -> std::process::Child {
    Command::new("ip")
        .args(["netns", "exec", &from.name, "ping", "-q", "-i", "0.005", "-W", "1", "-c"])
        .arg(count.to_string())
        .arg(dst.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// (transmitted, received) of a [`ping_flood`].
pub fn ping_result(child: std::process::Child) -> (u32, u32) {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("packets transmitted")).unwrap_or_else(|| panic!("{text}"));
    let nums: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|w| w.parse().ok()).collect();
    (nums[0], nums[1])
}
