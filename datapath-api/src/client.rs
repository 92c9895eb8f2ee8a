//! The blocking client of the agent's API: one request, one answer per
//! connection, every step bounded by a timeout.

use std::{
    io::Write as _,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent is not reachable at {path} (is datapath-agent running?)")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent is there but took no call within the timeout: its backlog
    /// is full, or it accepted nothing or did not answer (overloaded, out of
    /// file descriptors). Transient: the caller should try again later.
    #[error("agent at {path} did not take or answer the call within {timeout:?} (overloaded?)")]
    Busy {
        path: PathBuf,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the connection without answering (it is restarting
    /// or stopped meanwhile). Transient as well.
    #[error("agent at {path} closed the connection without answering (restarting?)")]
    Closed {
        path: PathBuf,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error("talking to the agent at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("agent sent an unreadable answer")]
    Decode(#[source] serde_json::Error),
    #[error("agent refused: {0}")]
    Refused(String),
}

/// Send one request and wait for its answer (blocking: the CNI plugin is a
/// short-lived process that does one thing at a time). Every step, the
/// connect included, gives up after `timeout`: a connect waits while the
/// agent's backlog is full, and without a send timeout it would wait forever.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, ClientError> {
    let classify = |source: std::io::Error| classify_io(socket, timeout, source);
    let stream = connect(socket, timeout).map_err(|source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => classify(source),
        _ => ClientError::Unreachable { path: socket.to_owned(), source },
    })?;
    let mut line = serde_json::to_vec(request).map_err(ClientError::Decode)?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(classify)?;
    let answer =
        read_answer(&stream, std::time::Instant::now() + timeout).map_err(|source| match source.kind() {
            std::io::ErrorKind::InvalidData => ClientError::Io { path: socket.to_owned(), source },
            _ => classify(source),
        })?;
    if answer.is_empty() {
        return Err(ClientError::Closed { path: socket.to_owned(), source: None });
    }
    match serde_json::from_slice(&answer).map_err(ClientError::Decode)? {
        Response::Error { message } => Err(ClientError::Refused(message)),
        ok => Ok(ok),
    }
}

/// The largest answer taken: the biggest real one (every endpoint of a full
/// node, for GC) is a few megabytes; something at the socket that sends
/// more is not the agent.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

/// One answer line, read by `deadline` (the whole answer, not each read: a
/// peer sending a byte at a time gets no longer) and at most
/// [`MAX_ANSWER_BYTES`] long (`InvalidData` past it).
fn read_answer(stream: &UnixStream, deadline: std::time::Instant) -> std::io::Result<Vec<u8>> {
    use std::io::{ErrorKind, Read as _};
    let mut answer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(ErrorKind::TimedOut, "no whole answer in time"));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            // Closed: what came is all (empty: no answer).
            return Ok(answer);
        }
        if let Some(end) = chunk[..n].iter().position(|b| *b == b'\n') {
            answer.extend_from_slice(&chunk[..end]);
            return Ok(answer);
        }
        answer.extend_from_slice(&chunk[..n]);
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                format!("the answer is longer than {MAX_ANSWER_BYTES} bytes: not the agent's"),
            ));
        }
    }
}

/// A unix stream socket connected to `path`, with read and write timeouts
/// (the write timeout also bounds the connect).
fn connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

/// Which failure an I/O error on a connected (or connecting) socket means:
/// no answer in time and a closed connection are transient; the rest is not.
fn classify_io(path: &Path, timeout: Duration, source: std::io::Error) -> ClientError {
    use std::io::ErrorKind;
    let path = path.to_owned();
    match source.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::Busy { path, timeout, source },
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof => {
            ClientError::Closed { path, source: Some(source) }
        }
        _ => ClientError::Io { path, source },
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader};

    use super::*;

    /// A listening socket in a fresh directory (removed on drop), never
    /// accepting by itself: `backlog` connections fit in its queue.
    struct SilentListener {
        dir: PathBuf,
        path: PathBuf,
        socket: socket2::Socket,
    }

    impl SilentListener {
        fn new(name: &str, backlog: i32) -> Self {
            use socket2::{Domain, SockAddr, Socket, Type};
            let dir = std::env::temp_dir().join(format!("dpt-api-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("agent.sock");
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            socket.bind(&SockAddr::unix(&path).unwrap()).unwrap();
            socket.listen(backlog).unwrap();
            Self { dir, path, socket }
        }
    }

    impl Drop for SilentListener {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    const SHORT: Duration = Duration::from_millis(300);

    #[test]
    fn no_socket_is_unreachable() {
        let path = std::env::temp_dir().join(format!("dp-api-test-{}-none.sock", std::process::id()));
        let e = call(&path, &Request::Status, SHORT).unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    }

    #[test]
    fn a_full_backlog_is_busy_after_the_timeout_not_a_hang() {
        // Backlog 0 holds one connection: the second waits for room.
        let listener = SilentListener::new("full", 0);
        let _queued = UnixStream::connect(&listener.path).unwrap();
        let started = std::time::Instant::now();
        let e = call(&listener.path, &Request::Status, SHORT).unwrap_err();
        assert!(matches!(e, ClientError::Busy { .. }), "{e:?}");
        assert!(started.elapsed() < SHORT * 10, "gave up after {:?}", started.elapsed());
    }

    #[test]
    fn a_connection_nobody_accepts_or_answers_is_busy() {
        let listener = SilentListener::new("mute", 8);
        let e = call(&listener.path, &Request::Status, SHORT).unwrap_err();
        assert!(matches!(e, ClientError::Busy { .. }), "{e:?}");
    }

    #[test]
    fn a_connection_closed_without_an_answer_is_closed() {
        let listener = SilentListener::new("closing", 8);
        let socket = listener.socket.try_clone().unwrap();
        let closer = std::thread::spawn(move || {
            let (conn, _) = socket.accept().unwrap();
            let mut request = String::new();
            BufReader::new(UnixStream::from(conn)).read_line(&mut request).unwrap();
        });
        let e = call(&listener.path, &Request::Status, Duration::from_secs(5)).unwrap_err();
        closer.join().unwrap();
        assert!(matches!(e, ClientError::Closed { .. }), "{e:?}");
    }
}
