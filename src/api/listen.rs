//! Accepting connections, with the bounds `axum::serve` does not have: a cap on open
//! connections, a deadline for a request's headers, and an idle timeout.
//!
//! With `axum::serve`'s defaults a client could hold a connection open forever without sending
//! a byte; a few hundred such sockets exhausted the open-file limit and made `/health` and
//! every write time out. Here every connection holds a permit of a semaphore (past the cap,
//! new connections wait in the kernel's listen backlog, so the server never runs out of file
//! descriptors), hyper closes a connection whose headers do not arrive in time, and a
//! connection that neither reads nor writes for the idle timeout is shut down gracefully:
//! hyper lets a request in flight finish first, so a long generation is never cut off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// What one connection may take.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the connection
    /// starts waiting for a request.
    pub header_read_timeout: Duration,
    /// Time a connection may go without reading or writing a byte.
    pub idle_timeout: Duration,
    /// Most connections open at once from one client address.
    pub max_per_client: usize,
    /// Time after which a connection that has moved no byte is closed outright, even with a
    /// request in flight: longer than any answer may take without a byte (a non-streamed
    /// answer's deadline; streams send keep-alives), so only a connection that is stuck, or
    /// held open on purpose, reaches it.
    pub stuck_timeout: Duration,
}

/// Open connections per client address, bounded by `max_per_client`.
#[derive(Default)]
struct PerClient(parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One client's hold on a connection; released when the connection ends.
struct ClientSlot {
    clients: Arc<PerClient>,
    ip: std::net::IpAddr,
}

impl PerClient {
    fn claim(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let mut open = self.0.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.0.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and returns once
/// every open connection has finished its requests and closed.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let clients = Arc::new(PerClient::default());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on a full table.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // One client may not take every connection: past its share, its new connections are
        // closed at once (dropped), and other clients still get in.
        let Some(slot) = clients.claim(peer.ip(), limits.max_per_client) else {
            tracing::debug!(client = %peer.ip(), "connection refused: this client has its most open");
            continue;
        };
        // Streams are written a chunk at a time; without TCP_NODELAY, Nagle's algorithm holds
        // each small write back until the client's delayed ACK (about 40 ms a chunk on Linux).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        let (builder, app, stop) = (builder.clone(), app.clone(), stop_rx.clone());
        let timeouts = (limits.idle_timeout, limits.stuck_timeout);
        tokio::spawn(async move {
            connection(&builder, tcp, app, timeouts, stop).await;
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it ends; all of them back means all are closed.
    let _ = permits.acquire_many(limits.max_connections as u32).await;
}

/// Runs one connection to its end, shutting it down gracefully when it idles too long or the
/// server stops, and closing it outright when it moves no byte for `stuck`.
async fn connection(
    builder: &hyper::server::conn::http1::Builder,
    tcp: TcpStream,
    app: axum::Router,
    (idle, stuck): (Duration, Duration),
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: tcp,
        activity: activity.clone(),
    });
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    let mut closing = false;
    let mut tick = tokio::time::interval(
        idle.min(Duration::from_secs(1))
            .max(Duration::from_millis(100)),
    );
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                let quiet = activity.idle_for();
                if quiet >= stuck {
                    tracing::debug!(quiet_secs = quiet.as_secs(), "closing a stuck connection");
                    return;
                }
                if quiet >= idle && !closing {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// When a connection last moved a byte, in milliseconds since it opened.
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let now = self.opened.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// A TCP stream that notes every read and write that moved bytes.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's open-file limit to its hard maximum and returns how many connections
/// fit under it, leaving room for the model, the libraries' files and sandbox pipes.
pub fn fit_connections(wanted: usize) -> usize {
    const RESERVED: u64 = 256;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an initialised struct; raising the
    // soft limit up to the hard one is always permitted.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return wanted;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    let room = soft.saturating_sub(RESERVED).max(16) as usize;
    if wanted > room {
        tracing::warn!(
            wanted,
            allowed = room,
            open_file_limit = soft,
            "server.max_connections is above what the open-file limit allows; using the lower number"
        );
        eprintln!(
            "experient: server.max_connections {wanted} lowered to {room} to fit the open-file limit ({soft})"
        );
        return room;
    }
    wanted
}
