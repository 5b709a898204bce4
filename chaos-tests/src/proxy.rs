//! A user-space WAN between the sites (the kernel here has no netem): a UDP
//! relay that adds latency and jitter, loss, duplication, reordering and a
//! bandwidth cap, and partitions either direction, all changeable while
//! it runs. "Up" is the primary's packets to the DR site, "down" the answers.

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// How one direction misbehaves.
#[derive(Clone, Debug, Default)]
pub struct Leg {
    pub delay: Duration,
    pub jitter: Duration,
    /// Percent of packets dropped.
    pub loss_pct: f64,
    pub dup_pct: f64,
    /// Percent of packets held back an extra delay (arrive after later ones).
    pub reorder_pct: f64,
    /// Bytes per second (0: no cap); a queue over a second of it drops.
    pub rate: u64,
    /// Every packet dropped (a partition of this direction).
    pub cut: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Impair {
    pub up: Leg,
    pub down: Leg,
}

impl Impair {
    /// A two-way partition.
    pub fn cut() -> Impair {
        let leg = Leg {
            cut: true,
            ..Leg::default()
        };
        Impair {
            up: leg.clone(),
            down: leg,
        }
    }
}

struct Packet {
    due: Instant,
    n: u64,
    data: Vec<u8>,
    /// None: up, to the target; Some(client): down, to that client.
    to: Option<SocketAddr>,
    via: Option<Arc<UdpSocket>>,
}

impl PartialEq for Packet {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.n) == (o.due, o.n)
    }
}
impl Eq for Packet {}
impl PartialOrd for Packet {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Packet {
    /// The earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.n).cmp(&(self.due, self.n))
    }
}

struct Shared {
    impair: Mutex<Impair>,
    queue: Mutex<BinaryHeap<Packet>>,
    ready: Condvar,
    stop: AtomicBool,
    seq: AtomicU64,
    /// When each direction's link is next free (the bandwidth cap).
    free_at: Mutex<[Instant; 2]>,
    rng: Mutex<rand::rngs::StdRng>,
    pub dropped: AtomicU64,
}

pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Relays 127.0.0.1:(new port) to `target`.
    pub fn start(target: SocketAddr, seed: u64) -> std::io::Result<Proxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        big_buffers(&front);
        front.set_read_timeout(Some(Duration::from_millis(50)))?;
        let shared = Arc::new(Shared {
            impair: Mutex::new(Impair::default()),
            queue: Mutex::new(BinaryHeap::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            free_at: Mutex::new([Instant::now(); 2]),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
            dropped: AtomicU64::new(0),
        });
        let addr = front.local_addr()?;
        let mut threads = Vec::new();
        let (s, f) = (shared.clone(), front.clone());
        threads.push(std::thread::spawn(move || sender(&s, &f)));
        let s = shared.clone();
        threads.push(std::thread::spawn(move || front_loop(&s, &front, target)));
        Ok(Proxy {
            addr,
            shared,
            threads,
        })
    }

    pub fn set(&self, i: Impair) {
        *self.shared.impair.lock().unwrap_or_else(|p| p.into_inner()) = i;
    }

    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Schedules a packet per the direction's impairment.
fn enqueue(
    s: &Shared,
    up: bool,
    data: Vec<u8>,
    to: Option<SocketAddr>,
    via: Option<Arc<UdpSocket>>,
) {
    let leg = {
        let i = s.impair.lock().unwrap_or_else(|p| p.into_inner());
        if up { i.up.clone() } else { i.down.clone() }
    };
    let mut rng = s.rng.lock().unwrap_or_else(|p| p.into_inner());
    if leg.cut || rng.random_range(0.0..100.0) < leg.loss_pct {
        s.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let now = Instant::now();
    let mut at = now;
    if leg.rate > 0 {
        let mut free = s.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut free[usize::from(!up)];
        let start = (*slot).max(now);
        if start > now + Duration::from_secs(1) {
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return; // the bottleneck's queue is full
        }
        *slot = start + Duration::from_secs_f64(data.len() as f64 / leg.rate as f64);
        at = *slot;
    }
    let jitter = if leg.jitter.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_micros(rng.random_range(0..leg.jitter.as_micros() as u64))
    };
    let mut due = at + leg.delay + jitter;
    if rng.random_range(0.0..100.0) < leg.reorder_pct {
        due += leg.delay.max(Duration::from_millis(5));
    }
    let copies = if rng.random_range(0.0..100.0) < leg.dup_pct {
        2
    } else {
        1
    };
    drop(rng);
    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..copies {
        q.push(Packet {
            due,
            n: s.seq.fetch_add(1, Ordering::Relaxed),
            data: data.clone(),
            to,
            via: via.clone(),
        });
    }
    s.ready.notify_one();
}

/// The primary's packets: each client address gets a socket of its own
/// towards the target, and a thread relaying the answers back.
fn front_loop(s: &Arc<Shared>, front: &Arc<UdpSocket>, target: SocketAddr) {
    let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut readers = Vec::new();
    let mut buf = vec![0u8; 65536];
    while !s.stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = front.recv_from(&mut buf) else {
            continue;
        };
        let back = match backs.get(&from) {
            Some(b) => b.clone(),
            None => {
                let Ok(b) = UdpSocket::bind("127.0.0.1:0").and_then(|b| {
                    big_buffers(&b);
                    b.connect(target)?;
                    b.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok(Arc::new(b))
                }) else {
                    continue;
                };
                backs.insert(from, b.clone());
                let (s2, b2) = (s.clone(), b.clone());
                readers.push(std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !s2.stop.load(Ordering::SeqCst) {
                        if let Ok(n) = b2.recv(&mut buf) {
                            enqueue(&s2, false, buf[..n].to_vec(), Some(from), None);
                        }
                    }
                }));
                b
            }
        };
        enqueue(s, true, buf[..n].to_vec(), None, Some(back));
    }
    for r in readers {
        let _ = r.join();
    }
}

/// Socket buffers of the proxy's sockets: a burst at 1 Gbit/s waits in
/// them while a thread is busy, instead of being dropped by the kernel
/// (where the proxy would not count it). Forced past `rmem_max` when root.
const SOCKET_BUFFER_BYTES: libc::c_int = 16 << 20;

fn big_buffers(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    for opt in [
        libc::SO_RCVBUFFORCE,
        libc::SO_SNDBUFFORCE,
        libc::SO_RCVBUF,
        libc::SO_SNDBUF,
    ] {
        // SAFETY: setsockopt reads an int from a live local; the fd is open.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Sends each packet when it is due: those due are taken out under the
/// queue's lock and sent after it (the receivers enqueue meanwhile).
fn sender(s: &Shared, front: &UdpSocket) {
    let mut q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
    let mut due_now = Vec::new();
    while !s.stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        match q.peek().map(|p| p.due) {
            Some(due) if due <= now => {
                while q.peek().is_some_and(|p| p.due <= now) {
                    due_now.extend(q.pop());
                }
                drop(q);
                for p in due_now.drain(..) {
                    match (&p.via, p.to) {
                        (Some(back), _) => {
                            let _ = back.send(&p.data);
                        }
                        (None, Some(to)) => {
                            let _ = front.send_to(&p.data, to);
                        }
                        _ => {}
                    }
                }
                q = s.queue.lock().unwrap_or_else(|p| p.into_inner());
            }
            Some(due) => {
                q = s
                    .ready
                    .wait_timeout(q, due - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            None => {
                q = s
                    .ready
                    .wait_timeout(q, Duration::from_millis(50))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
    }
}
