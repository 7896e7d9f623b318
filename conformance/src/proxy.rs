//! A UDP fault proxy to put between homeservers: it forwards datagrams both ways and, as
//! told, drops, duplicates, reorders and delays them, or cuts the link entirely
//! (partition) until healed. Every random choice comes from one seeded generator per
//! proxy, so a schedule replays from its seed (the interleaving of datagrams on a real
//! network still varies from run to run).
//!
//! The proxy listens on its own address; a server that should reach `target` through it
//! is given the proxy's address instead. Each client address seen gets its own upstream
//! socket, so the target sees one peer per client, and answers go back the way they came.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// Fault rates, each a probability per datagram in `0.0..=1.0`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    /// Hold the datagram back and send it after the next one in the same direction.
    pub reorder: f64,
    /// Delay every datagram by a random time up to this.
    pub max_delay: Duration,
}

/// What the proxy did, for reports.
#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    pub partitioned: AtomicU64,
}

/// A datagram ready to go: the socket to send it from, where to, and its bytes.
type Datagram = (Arc<UdpSocket>, SocketAddr, Vec<u8>);

struct State {
    faults: Faults,
    partitioned: bool,
    rng: StdRng,
    /// One held datagram per direction (to client, to target), for reordering.
    held: [Option<Datagram>; 2],
}

/// What to do with one datagram, decided under the lock.
struct Fate {
    copies: usize,
    delay: Duration,
    /// Send the previously held datagram after this one.
    release: Option<Datagram>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub target: SocketAddr,
    state: Arc<Mutex<State>>,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

const TO_TARGET: usize = 0;
const TO_CLIENT: usize = 1;

impl Proxy {
    /// Starts a proxy on `listen_ip` (a free port) forwarding to `target`.
    pub async fn start(listen_ip: std::net::IpAddr, target: SocketAddr, seed: u64) -> std::io::Result<Proxy> {
        let socket = Arc::new(UdpSocket::bind(SocketAddr::new(listen_ip, 0)).await?);
        let addr = socket.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            faults: Faults::default(),
            partitioned: false,
            rng: StdRng::seed_from_u64(seed),
            held: [None, None],
        }));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(socket, target, state.clone(), counters.clone()));
        Ok(Proxy { addr, target, state, counters, task })
    }

    pub fn set_faults(&self, f: Faults) {
        self.lock().faults = f;
    }

    /// Cuts the link both ways (`true`) or heals it.
    pub fn partition(&self, cut: bool) {
        self.lock().partitioned = cut;
    }

    pub fn is_partitioned(&self) -> bool {
        self.lock().partitioned
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Datagrams to send now, in order.
type Sender = tokio::sync::mpsc::UnboundedSender<Datagram>;

async fn run(listen: Arc<UdpSocket>, target: SocketAddr, state: Arc<Mutex<State>>, counters: Arc<Counters>) {
    let (sender, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Datagram>();
    let mut children = vec![tokio::spawn(async move {
        while let Some((s, to, d)) = outgoing.recv().await {
            let _ = s.send_to(&d, to).await;
        }
    })];
    let mut upstreams: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, client)) = listen.recv_from(&mut buf).await else { break };
        let up = match upstreams.get(&client) {
            Some(u) => u.clone(),
            None => {
                let Ok(u) = UdpSocket::bind(SocketAddr::new(target.ip(), 0)).await else { continue };
                let u = Arc::new(u);
                upstreams.insert(client, u.clone());
                // Answers from the target go back to this client through the listener.
                let (u2, l2, st, c2, tx) = (u.clone(), listen.clone(), state.clone(), counters.clone(), sender.clone());
                children.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, _)) = u2.recv_from(&mut buf).await {
                        forward(&st, &c2, &tx, TO_CLIENT, l2.clone(), client, buf[..n].to_vec());
                    }
                }));
                u
            }
        };
        forward(&state, &counters, &sender, TO_TARGET, up, target, buf[..n].to_vec());
    }
    for c in children {
        c.abort();
    }
}

/// Applies the faults to one datagram and sends what survives.
fn forward(state: &Mutex<State>, counters: &Counters, sender: &Sender, dir: usize, socket: Arc<UdpSocket>, to: SocketAddr, data: Vec<u8>) {
    let fate = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.partitioned {
            counters.partitioned.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let f = s.faults;
        if f.drop > 0.0 && s.rng.gen_bool(f.drop.min(1.0)) {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if f.reorder > 0.0 && s.held[dir].is_none() && s.rng.gen_bool(f.reorder.min(1.0)) {
            counters.reordered.fetch_add(1, Ordering::Relaxed);
            s.held[dir] = Some((socket, to, data));
            return;
        }
        let copies = if f.duplicate > 0.0 && s.rng.gen_bool(f.duplicate.min(1.0)) {
            counters.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let delay = if f.max_delay.is_zero() { Duration::ZERO } else { f.max_delay.mul_f64(s.rng.gen::<f64>()) };
        Fate { copies, delay, release: s.held[dir].take() }
    };
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let mut out = vec![(socket, to, data); fate.copies];
    out.extend(fate.release);
    if fate.delay.is_zero() {
        // In order, through the one sending task.
        for d in out {
            let _ = sender.send(d);
        }
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(fate.delay).await;
        for (s, to, d) in out {
            let _ = s.send_to(&d, to).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, h)
    }

    /// Sends `n` numbered datagrams through the proxy and collects the echoes until
    /// `want` arrived or none came for a while.
    async fn exchange(p: &Proxy, n: u32, want: usize) -> Vec<u32> {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0..n {
            c.send_to(&i.to_be_bytes(), p.addr).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < want {
            match tokio::time::timeout(Duration::from_millis(300), c.recv_from(&mut buf)).await {
                Ok(Ok((4, _))) => got.push(u32::from_be_bytes(buf[..4].try_into().unwrap())),
                _ => break,
            }
        }
        got
    }

    #[tokio::test]
    async fn forwards_both_ways_and_cuts_and_heals() {
        let (target, _h) = echo_server().await;
        let p = Proxy::start([127, 0, 0, 1].into(), target, 1).await.unwrap();
        assert_eq!(exchange(&p, 5, 5).await, vec![0, 1, 2, 3, 4]);
        p.partition(true);
        assert!(exchange(&p, 5, 1).await.is_empty(), "a partitioned link let datagrams through");
        p.partition(false);
        assert_eq!(exchange(&p, 3, 3).await.len(), 3);
    }

    #[tokio::test]
    async fn drops_and_duplicates_at_the_rates_set() {
        let (target, _h) = echo_server().await;
        let p = Proxy::start([127, 0, 0, 1].into(), target, 7).await.unwrap();
        p.set_faults(Faults { drop: 0.3, ..Default::default() });
        let got = exchange(&p, 400, 400).await;
        // Each datagram crosses twice: about half of them survive both ways.
        assert!((120..300).contains(&got.len()), "{} of 400 survived 30% loss each way", got.len());
        p.set_faults(Faults { duplicate: 1.0, ..Default::default() });
        let got = exchange(&p, 10, 40).await;
        assert_eq!(got.len(), 40, "every datagram doubled each way");
    }

    #[tokio::test]
    async fn reorders_within_a_direction() {
        let target = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let p = Proxy::start([127, 0, 0, 1].into(), target.local_addr().unwrap(), 3).await.unwrap();
        p.set_faults(Faults { reorder: 1.0, ..Default::default() });
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for i in 0u32..10 {
            c.send_to(&i.to_be_bytes(), p.addr).await.unwrap();
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 10 {
            let (n, _) = tokio::time::timeout(Duration::from_secs(5), target.recv_from(&mut buf)).await.unwrap().unwrap();
            got.push(u32::from_be_bytes(buf[..n].try_into().unwrap()));
        }
        assert_eq!(got, vec![1, 0, 3, 2, 5, 4, 7, 6, 9, 8], "each held datagram follows the next one");
    }
}
