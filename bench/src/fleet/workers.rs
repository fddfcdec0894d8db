//! The simulated fleet: N workers in this process, each the real lease client
//! ([`LeaseClient`]: its own gRPC connection and `Work` stream, credits, heartbeats, reports kept
//! until answered), with executors that finish at once.
//!
//! Worker `i` is in zone `a` or `b` (`i % 2`); within a zone, every five are a witness
//! generator, two WVGs (prover groups 1 and 0) and two provers (groups 1 and 0, capacity 2,
//! both protocol versions); witness generators and WVGs declare one of the two versions
//! (alternating by zone and by five). Every worker has a host of its own, so a WVG is matched
//! with a prover of its zone.
//!
//! - Witness generator: reports `Completed` at once (round 0: one circuit of each basic type,
//!   so the scheduler plans the batch), then frees the slot.
//! - WVG: "pushes" to the prover the lease names (an in-process hand-off: no witness vector
//!   bytes), which takes the lease over with a heartbeat as a real prover does once it has the
//!   whole vector; the WVG frees its slot (its part ends with the receipt) and the prover
//!   reports `Completed` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proofmesh_proto::v1::{self, Role};
use proofmesh_worker::lease::{LeaseClient, Registration};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::queue::{JobKey, DEPTH_BASE, SAMPLE_BASE, VERSIONS};

/// Prover slots (witness vectors at once).
pub const PROVER_CAPACITY: u32 = 2;

/// What worker `i` of the fleet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub role: Role,
    pub zone: usize,
    /// Index into [`VERSIONS`] (provers declare both).
    pub version: usize,
    /// Prover group (WVGs and provers).
    pub group: Option<u32>,
}

/// The layout described in the module comment.
pub fn member(i: usize) -> Member {
    let zone = i % 2;
    let slot = i / 2;
    let (unit, pos) = (slot / 5, slot % 5);
    let role = match pos {
        0 => Role::WitnessGenerator,
        1 | 2 => Role::Wvg,
        _ => Role::Prover,
    };
    let group = (role != Role::WitnessGenerator).then_some((pos % 2) as u32);
    Member { role, zone, version: (unit + zone) % 2, group }
}

/// A timestamped event of a latency sample's batch.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub at: Instant,
    pub batch: u32,
    pub what: What,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A witness generator received the batch's round-0 lease.
    WgLease,
    /// ... and is about to send its `Completed`.
    WgCompletedSent,
    /// A WVG received a round-0 proving lease of the batch.
    ProvingLease,
}

/// What the workers share with the harness.
pub struct Shared {
    /// Leases of queue (cycle) jobs received.
    pub cycle_leases: AtomicU64,
    /// Leases of other jobs received (latency samples and their pipeline).
    pub other_leases: AtomicU64,
    /// WVG leases naming a prover this fleet does not know (should stay 0).
    pub unmatched: AtomicU64,
    /// Completed cycle jobs, for the requeue task (only while `collect`).
    pub completed: Mutex<Vec<JobKey>>,
    pub collect: std::sync::atomic::AtomicBool,
    events: mpsc::UnboundedSender<Event>,
    /// Nanoseconds since `epoch` of the last lease received.
    last_lease: AtomicU64,
    epoch: Instant,
    provers: Mutex<HashMap<String, Arc<LeaseClient>>>,
    prover_list: Mutex<Vec<Arc<LeaseClient>>>,
}

impl Shared {
    fn touch(&self) {
        self.last_lease.store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Time since the last lease arrived anywhere in the fleet.
    pub fn since_last_lease(&self) -> Duration {
        self.epoch.elapsed().saturating_sub(Duration::from_nanos(self.last_lease.load(Ordering::Relaxed)))
    }

    fn prover(&self, id: &str) -> Option<Arc<LeaseClient>> {
        if let Some(p) = self.provers.lock().expect("poisoned").get(id) {
            return Some(p.clone());
        }
        // Reconnected since the map was built: look again.
        let list = self.prover_list.lock().expect("poisoned").clone();
        let found = list.into_iter().find(|p| p.worker_id() == id)?;
        self.provers.lock().expect("poisoned").insert(id.to_string(), found.clone());
        Some(found)
    }
}

/// A connected fleet.
pub struct Fleet {
    pub shared: Arc<Shared>,
    pub members: Vec<Member>,
    clients: Vec<Arc<LeaseClient>>,
    stop: CancellationToken,
}

fn completed(lease_id: &str, circuits: Vec<v1::CircuitCount>) -> v1::Completed {
    v1::Completed { lease_id: lease_id.into(), circuits, compute_secs: 0.0, output_bytes: 0, verified_against_batch: true }
}

fn key_of(job: &v1::JobIdentity) -> JobKey {
    let kind = match v1::JobKind::try_from(job.kind) {
        Ok(v1::JobKind::WitnessGeneration) => "witness_generation",
        Ok(v1::JobKind::Compression) => "compression",
        _ => "proving",
    };
    JobKey {
        batch: i64::from(job.batch_number),
        kind,
        round: job.aggregation_round as i16,
        circuit: job.circuit_id as i16,
        depth: job.depth as i16,
        seq: job.sequence_number as i32,
    }
}

async fn run_worker(role: Role, client: Arc<LeaseClient>, mut leases: mpsc::Receiver<v1::Lease>, shared: Arc<Shared>) {
    while let Some(lease) = leases.recv().await {
        let now = Instant::now();
        shared.touch();
        let job = lease.job.unwrap_or_default();
        let sample = (SAMPLE_BASE..DEPTH_BASE).contains(&job.batch_number);
        if job.batch_number >= DEPTH_BASE {
            shared.cycle_leases.fetch_add(1, Ordering::Relaxed);
            if shared.collect.load(Ordering::Relaxed) {
                shared.completed.lock().expect("poisoned").push(key_of(&job));
            }
        } else {
            shared.other_leases.fetch_add(1, Ordering::Relaxed);
        }
        let id = lease.lease_id.clone();
        match role {
            Role::Wvg => {
                if sample && job.aggregation_round == 0 {
                    let _ = shared.events.send(Event { at: now, batch: job.batch_number, what: What::ProvingLease });
                }
                match shared.prover(&lease.prover_worker_id) {
                    Some(prover) => {
                        prover.hold(&id);
                        client.release(&id);
                        prover.completed(completed(&id, vec![]));
                        prover.unhold(&id);
                    }
                    None => {
                        shared.unmatched.fetch_add(1, Ordering::Relaxed);
                        client.failed(&id, "fleet bench: the lease names no simulated prover", true, false);
                        client.release(&id);
                    }
                }
            }
            _ => {
                let circuits = if job.aggregation_round == 0 && v1::JobKind::try_from(job.kind) == Ok(v1::JobKind::WitnessGeneration) {
                    (1..=3).map(|circuit_id| v1::CircuitCount { circuit_id, count: 1 }).collect()
                } else {
                    vec![]
                };
                if sample && job.aggregation_round == 0 {
                    let _ = shared.events.send(Event { at: now, batch: job.batch_number, what: What::WgLease });
                    let _ = shared.events.send(Event { at: Instant::now(), batch: job.batch_number, what: What::WgCompletedSent });
                }
                client.completed(completed(&id, circuits));
                client.release(&id);
            }
        }
    }
}

impl Fleet {
    /// Connects `n` workers to the scheduler at `url`, `wave` at a time, each wave waiting until
    /// its workers are registered (up to `within` in all). Returns the fleet and the receiver of
    /// sample events.
    /// `collect`: record completed cycle jobs from the first lease on (for the requeue task).
    pub async fn connect(url: &str, n: usize, wave: usize, within: Duration, collect: bool) -> anyhow::Result<(Fleet, mpsc::UnboundedReceiver<Event>)> {
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            cycle_leases: AtomicU64::new(0),
            other_leases: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            completed: Mutex::default(),
            collect: std::sync::atomic::AtomicBool::new(collect),
            events,
            last_lease: AtomicU64::new(0),
            epoch: Instant::now(),
            provers: Mutex::default(),
            prover_list: Mutex::default(),
        });
        let stop = CancellationToken::new();
        let members: Vec<Member> = (0..n).map(member).collect();
        let mut clients = Vec::with_capacity(n);
        let deadline = Instant::now() + within;
        // Provers first, so every WVG lease names a prover whose registration this fleet saw.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| members[i].role != Role::Prover);
        for chunk in order.chunks(wave.max(1)) {
            let mut this_wave = vec![];
            for &i in chunk {
                let m = &members[i];
                let zone = ["a", "b"][m.zone];
                let versions = match m.role {
                    Role::Prover => VERSIONS.to_vec(),
                    _ => vec![VERSIONS[m.version]],
                };
                let role_name = match m.role {
                    Role::WitnessGenerator => "wg",
                    Role::Wvg => "wvg",
                    _ => "prover",
                };
                let reg = Registration {
                    scheduler: url.to_string(),
                    role: m.role,
                    name: format!("fleet-{role_name}-{i}"),
                    zone: zone.into(),
                    region: "fleet".into(),
                    host: format!("fleet-host-{i}"),
                    capacity: if m.role == Role::Prover { PROVER_CAPACITY } else { 1 },
                    prover_endpoint: if m.role == Role::Prover { format!("http://127.0.0.1:9/fleet-prover-{i}") } else { String::new() },
                    protocol_versions: versions.into_iter().map(|(minor, patch)| v1::ProtocolVersion { minor: minor.into(), patch: patch.into() }).collect(),
                    prover_group: m.group,
                    memory_budget_mib: 0,
                    tls: Default::default(),
                };
                let (client, leases) = LeaseClient::start(reg, stop.clone());
                if m.role == Role::Prover {
                    shared.prover_list.lock().expect("poisoned").push(client.clone());
                } else {
                    tokio::spawn(run_worker(m.role, client.clone(), leases, shared.clone()));
                }
                this_wave.push(client.clone());
                clients.push(client);
            }
            loop {
                if let Some(refused) = this_wave.iter().find_map(|c| c.refusal()) {
                    stop.cancel();
                    anyhow::bail!("{refused}");
                }
                let waiting = this_wave.iter().filter(|c| c.worker_id().is_empty()).count();
                if waiting == 0 {
                    break;
                }
                if Instant::now() > deadline {
                    stop.cancel();
                    anyhow::bail!("{waiting} of {n} workers not registered within {within:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        {
            let list = shared.prover_list.lock().expect("poisoned").clone();
            let mut map = shared.provers.lock().expect("poisoned");
            for p in list {
                map.insert(p.worker_id(), p);
            }
        }
        Ok((Fleet { shared, members, clients, stop }, rx))
    }

    /// Waits until no lease has arrived for `quiet`, up to `within`. Returns whether it got there.
    pub async fn quiet(&self, quiet: Duration, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.shared.since_last_lease() >= quiet {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Reports still unanswered, over the fleet.
    pub async fn settled(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        for c in &self.clients {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !c.settled(left).await {
                return false;
            }
        }
        true
    }

    /// Workers by role.
    pub fn census(&self) -> (usize, usize, usize) {
        let count = |r: Role| self.members.iter().filter(|m| m.role == r).count();
        (count(Role::WitnessGenerator), count(Role::Wvg), count(Role::Prover))
    }

    /// Closes every stream.
    pub fn disconnect(&self) {
        self.stop.cancel();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
