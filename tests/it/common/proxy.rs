//! A TCP proxy between hikkoshi and a server, for network faults: it forwards, stalls (bytes stop moving in
//! both directions, connections stay open, new ones are accepted and hang, as in a network partition),
//! drops (closes every open connection) or resets (closes them with RST). It runs on a thread and runtime
//! of its own, so blocking test code (a server restart, a child's wait) never starves it.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    stalled: bool,
    /// Connections opened under an older generation are closed.
    generation: u64,
    /// Close them with RST rather than FIN.
    reset: bool,
}

pub struct Proxy {
    /// The port hikkoshi connects to.
    pub port: u16,
    state: watch::Sender<State>,
    _runtime: std::thread::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:`port` (a free port) to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let (state, rx) = watch::channel(State::default());
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let runtime = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(client, upstream, rx.clone()));
                }
            });
        });
        Proxy {
            port: port_rx.recv().unwrap(),
            state,
            _runtime: runtime,
        }
    }

    /// A connection string for `dbname` through the proxy (the local servers' superuser).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname={dbname} sslmode=disable \
             connect_timeout=3",
            self.port,
            hikkoshi::localserver::PASSWORD
        )
    }

    /// Bytes stop moving, connections stay open.
    pub fn stall(&self) {
        self.state.send_modify(|s| s.stalled = true);
    }

    /// Bytes move again.
    pub fn resume(&self) {
        self.state.send_modify(|s| s.stalled = false);
    }

    /// Closes every open connection (FIN); new ones are forwarded.
    pub fn drop_all(&self) {
        self.state.send_modify(|s| {
            s.generation += 1;
            s.reset = false;
        });
    }

    /// Closes every open connection with RST; new ones are forwarded.
    pub fn reset_all(&self) {
        self.state.send_modify(|s| {
            s.generation += 1;
            s.reset = true;
        });
    }
}

async fn serve(mut client: TcpStream, upstream: u16, mut state: watch::Receiver<State>) {
    let generation = state.borrow().generation;
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return; // the server is down: the client sees the connection closed
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let (s1, s2) = (state.clone(), state.clone());
        tokio::select! {
            _ = pump(&mut cr, &mut sw, s1) => false,
            _ = pump(&mut sr, &mut cw, s2) => false,
            reset = ended(&mut state, generation) => reset,
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Waits until this connection's generation is over; returns whether to reset it.
async fn ended(state: &mut watch::Receiver<State>, generation: u64) -> bool {
    loop {
        {
            let s = *state.borrow_and_update();
            if s.generation != generation {
                return s.reset;
            }
        }
        if state.changed().await.is_err() {
            return false;
        }
    }
}

/// Waits while stalled.
async fn flowing(state: &mut watch::Receiver<State>) {
    loop {
        if !state.borrow_and_update().stalled {
            return;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Copies one direction until end of file or an error; holds the bytes while stalled.
async fn pump(
    r: &mut (impl AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    mut state: watch::Receiver<State>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        flowing(&mut state).await;
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        flowing(&mut state).await;
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
