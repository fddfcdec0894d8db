//! The connected workers: the only state the scheduler keeps in memory (it is rebuilt by the
//! workers reconnecting). Holds each worker's credits (leases it can still take), each prover's
//! free slots, which prover slot each WVG lease holds, and which leases each worker holds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proofmesh_proto::v1::{Role, SchedulerMessage};
use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

/// What the scheduler sends down a worker's `Work` stream.
pub type Outbox = mpsc::Sender<Result<SchedulerMessage, Status>>;

/// One connected worker.
#[derive(Debug)]
pub struct Conn {
    /// Scheduler-assigned id (also `workers.id`).
    pub id: String,
    /// The name it gave, for logs.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Its zone.
    pub zone: String,
    /// Its region.
    pub region: String,
    /// Its host.
    pub host: String,
    /// Provers: slots (witness vectors proven at once). Others: leases held at once (credits never exceed it).
    pub capacity: u32,
    /// Provers: where their `Prover` service listens.
    pub prover_endpoint: String,
    /// Packed protocol versions it accepts (empty: all).
    pub versions: Vec<i32>,
    /// Its prover group, if any.
    pub prover_group: Option<u32>,
    /// Packed `(aggregation_round, circuit_id)` pairs it takes (empty: all), from its group.
    pub pairs: Vec<crate::groups::PackedPair>,
    /// Memory budget for the weights of the jobs it holds, MiB (0: none).
    pub memory_budget_mib: u64,
    /// Packed pairs whose setup data it reported loaded (Register, Heartbeat).
    pub loaded_setups: Vec<crate::groups::PackedPair>,
    /// Leases it can still take, as its `Credit` messages said (at most its capacity); only
    /// [`Conn::grantable`] of them are used.
    pub credits: u32,
    /// Leases granted to this connection (or re-attached by it) that have not ended, with when
    /// it last named each (granted, re-attached, or in a heartbeat):
    /// credits buy leases only up to `capacity` minus these (issue 16 rule 1), so a worker that
    /// sends credits it does not have never holds more than its capacity. Not kept for provers
    /// (their slots bound them). Ended by its report, any lease end ([`crate::state::Shared::apply`]),
    /// a prover's take-over, or its heartbeats leaving it out for a lease timeout
    /// ([`Registry::heard_leases`]).
    pub held: HashMap<Uuid, Instant>,
    /// Provers: slots held by WVG leases.
    pub slots_used: u32,
    /// Provers: slots it said are proving in its last heartbeat (`Heartbeat.busy_slots`), less
    /// those its reports freed since. Matching counts the larger of the two ([`Conn::busy`]).
    pub reported_busy: u32,
    /// It sent `Drain`: no more leases, no more witness vectors.
    pub draining: bool,
    /// An operator drained its name (`Admin.DrainWorker`, kept in `drained_workers` until
    /// `Admin.ReleaseWorker`): the same.
    pub drained: bool,
    /// Its certificate subject (TLS on): leases granted to it are bound to it.
    pub identity: Option<String>,
    /// Its name is quarantined (proofs that did not verify): no leases, no witness vectors.
    pub quarantined: bool,
    /// Its stream.
    pub outbox: Outbox,
    /// The worker process's `Register.instance_id` (empty: none given).
    pub instance: String,
    /// Cancelled to end this stream from the scheduler's side (a reconnect of the same
    /// instance replaced it: [`Registry::replace_instance`]).
    pub ended: tokio_util::sync::CancellationToken,
}

impl Conn {
    /// Whether it may be given work: neither it nor an operator drained it.
    pub fn takes_work(&self) -> bool {
        !self.draining && !self.drained
    }

    /// Provers: slots taken, as far as the scheduler knows: the larger of those its WVG leases
    /// hold and those the prover last said are proving (a witness vector whose lease ended
    /// still holds the CPU; a lease matched before a restart is not in the registry).
    pub fn busy(&self) -> u32 {
        self.slots_used.max(self.reported_busy)
    }

    /// Leases it may be granted now: its credits, but never more than its capacity less the
    /// leases it holds ([`Conn::held`]).
    pub fn grantable(&self) -> u32 {
        self.credits.min(self.capacity.saturating_sub(self.held.len() as u32))
    }

    /// Provers: whether it may take one more witness vector now (a slot free, not drained).
    pub fn has_free_slot(&self) -> bool {
        self.busy() < self.capacity && self.takes_work()
    }
}

/// When a WVG may be matched with a prover of another zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZonePolicy {
    /// Never: wait for a prover of the WVG's zone.
    SameZoneOnly,
    /// When no prover of its zone is free.
    CrossZoneWhenNoneFree,
}

/// The connected workers.
#[derive(Debug, Default)]
pub struct Registry {
    workers: HashMap<String, Conn>,
    /// WVG lease -> the prover whose slot it holds.
    slots: HashMap<Uuid, String>,
    /// Lease -> the connection whose [`Conn::held`] has it.
    holders: HashMap<Uuid, String>,
}

impl Registry {
    /// Adds a worker.
    pub fn add(&mut self, conn: Conn) {
        self.workers.insert(conn.id.clone(), conn);
    }

    /// A registration of `instance` (a worker process's `Register.instance_id`) from
    /// `identity`: the connections it still has here are half-open leftovers of the same process
    /// (it reconnected because it found them dead). They leave the registry at once, so nothing
    /// more is sent into them, and are returned (id, token to end their stream). A connection of
    /// the same instance id but another identity (TLS on) is not the same process and stays.
    pub fn replace_instance(&mut self, instance: &str, identity: Option<&str>) -> Vec<(String, tokio_util::sync::CancellationToken)> {
        if instance.is_empty() {
            return vec![];
        }
        let old: Vec<String> = self
            .workers
            .values()
            .filter(|c| c.instance == instance && c.identity.as_deref() == identity)
            .map(|c| c.id.clone())
            .collect();
        old.into_iter().filter_map(|id| self.remove(&id).map(|c| (id, c.ended))).collect()
    }

    /// Removes a worker; the slots its WVG leases held on provers are freed, and the leases it
    /// held are no longer counted (a reconnect re-attaches them).
    pub fn remove(&mut self, id: &str) -> Option<Conn> {
        let conn = self.workers.remove(id)?;
        for lease in conn.held.keys() {
            self.holders.remove(lease);
        }
        let held: Vec<Uuid> = self.slots.iter().filter(|(_, p)| p.as_str() == id).map(|(l, _)| *l).collect();
        for lease in held {
            self.slots.remove(&lease);
        }
        Some(conn)
    }

    /// A worker by id.
    pub fn get(&self, id: &str) -> Option<&Conn> {
        self.workers.get(id)
    }

    /// A worker by id, mutably.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Conn> {
        self.workers.get_mut(id)
    }

    /// Counts `lease` as held by `worker` (granted to it, or re-attached by it), moving it from
    /// another connection that had it. A prover's is a take-over: the WVG that had it holds it
    /// no more, and the prover's slots, not its credits, count it.
    pub fn hold_lease(&mut self, worker: &str, lease: Uuid) {
        self.release_lease(lease);
        if let Some(c) = self.workers.get_mut(worker).filter(|c| c.role != Role::Prover) {
            c.held.insert(lease, Instant::now());
            self.holders.insert(lease, worker.to_string());
        }
    }

    /// `lease` is no longer held by the connection that had it (it ended, was reported, or a
    /// prover took it over). Returns whether a connection had it (it may take one more lease).
    pub fn release_lease(&mut self, lease: Uuid) -> bool {
        let Some(holder) = self.holders.remove(&lease) else { return false };
        self.workers.get_mut(&holder).is_some_and(|c| c.held.remove(&lease).is_some())
    }

    /// A heartbeat from `worker` named `leases`. A prover's takes them over from the WVGs that
    /// pushed them. Any other worker's renews its own, and drops those it has not named (nor
    /// been granted or re-attached) for `unrenewed_for`: a lease it no longer renews is not held (the worker forgot it, or
    /// lied; either way it expires within a lease timeout), so a report the scheduler never saw
    /// cannot shrink the worker's credits for good. Returns whether a lease was dropped.
    pub fn heard_leases(&mut self, worker: &str, leases: &[Uuid], unrenewed_for: Duration) -> bool {
        let Some(conn) = self.workers.get_mut(worker) else { return false };
        if conn.role == Role::Prover {
            return leases.iter().fold(false, |any, &l| self.release_lease(l) || any);
        }
        let now = Instant::now();
        for l in leases {
            if let Some(at) = conn.held.get_mut(l) {
                *at = now;
            }
        }
        let forgotten: Vec<Uuid> = conn.held.iter().filter(|(_, at)| now - **at >= unrenewed_for).map(|(l, _)| *l).collect();
        forgotten.iter().fold(false, |any, &l| self.release_lease(l) || any)
    }

    /// Every connected worker's id.
    pub fn ids(&self) -> Vec<String> {
        self.workers.keys().cloned().collect()
    }

    /// Every connected worker, by id.
    pub fn all(&self) -> Vec<&Conn> {
        let mut v: Vec<&Conn> = self.workers.values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Quarantines (or, `on` false, releases) every connection named `name`.
    pub fn quarantine(&mut self, name: &str, on: bool) {
        for c in self.workers.values_mut().filter(|c| c.name == name) {
            c.quarantined = on;
        }
    }

    /// Drains the workers whose id or name is `who` (no more leases, no more WVG matches), as an
    /// operator asked; their credits stay, for when they are released. Returns their
    /// `(id, name, identity)`, by id.
    pub fn drain(&mut self, who: &str) -> Vec<(String, String, Option<String>)> {
        let mut drained = vec![];
        for c in self.workers.values_mut().filter(|c| c.id == who || c.name == who) {
            c.drained = true;
            drained.push((c.id.clone(), c.name.clone(), c.identity.clone()));
        }
        drained.sort();
        drained
    }

    /// Lifts an operator's drain of every connection named `name` (not a drain the worker asked
    /// for itself).
    pub fn undrain(&mut self, name: &str) {
        for c in self.workers.values_mut().filter(|c| c.name == name) {
            c.drained = false;
        }
    }

    /// Workers that take leases (not provers) and may be granted one ([`Conn::grantable`]), by id.
    pub fn ready(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .workers
            .values()
            .filter(|c| c.grantable() > 0 && c.role != Role::Prover && c.takes_work())
            .map(|c| c.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Every prover `wvg` may be matched with now, best first: free, not draining or
    /// quarantined, sharing a protocol version and a pair of the WVG's prover group; the same
    /// host, then the same zone, then (with [`ZonePolicy::CrossZoneWhenNoneFree`]) another zone;
    /// among equals the one with the most free slots, then by id. The dispatcher tries them in
    /// this order until one can take a queued job (issue 16 rule 5: no job waits while a prover
    /// that can take it is free).
    pub fn provers_for(&self, wvg: &Conn, policy: ZonePolicy) -> Vec<String> {
        let fits = |p: &Conn| {
            let versions = wvg.versions.is_empty() || p.versions.is_empty() || wvg.versions.iter().any(|v| p.versions.contains(v));
            versions && crate::groups::intersect(&wvg.pairs, &p.pairs).is_some()
        };
        let mut ranked: Vec<(u8, u32, &str)> = vec![];
        for p in self.workers.values().filter(|p| p.role == Role::Prover && p.has_free_slot() && !p.quarantined && fits(p)) {
            let locality = match (p.zone == wvg.zone, p.host == wvg.host) {
                (true, true) => 0,
                (true, false) => 1,
                (false, _) if policy == ZonePolicy::CrossZoneWhenNoneFree => 2,
                _ => continue,
            };
            ranked.push((locality, u32::MAX - (p.capacity - p.busy()), p.id.as_str()));
        }
        ranked.sort_unstable();
        ranked.into_iter().map(|(_, _, id)| id.to_string()).collect()
    }

    /// Holds a slot of `prover` for `lease` (nothing if it holds one there already).
    pub fn hold_slot(&mut self, prover: &str, lease: Uuid) {
        if self.slots.get(&lease).is_some_and(|p| p == prover) {
            return;
        }
        self.free_slot(lease);
        if let Some(p) = self.workers.get_mut(prover) {
            p.slots_used += 1;
            self.slots.insert(lease, prover.to_string());
        }
    }

    /// A lease ended without its holder reporting (expired, or superseded by a late result):
    /// frees its prover slot, unless the holder is that prover itself. A prover that took the
    /// lease over still holds the witness vector, and the slot, until it reports or disconnects;
    /// a WVG that never pushed held the slot for nothing.
    pub fn lease_taken_away(&mut self, lease: Uuid, holder: Option<&str>) {
        if holder.is_none() || self.slots.get(&lease).map(String::as_str) != holder {
            self.free_slot(lease);
        }
    }

    /// The leases holding slots of `prover` (their job weights count against its memory budget).
    pub fn slot_leases(&self, prover: &str) -> Vec<Uuid> {
        self.slots.iter().filter(|(_, p)| p.as_str() == prover).map(|(l, _)| *l).collect()
    }

    /// The prover whose slot WVG lease `lease` holds (the one it was matched with), if any.
    pub fn slot_holder(&self, lease: Uuid) -> Option<&str> {
        self.slots.get(&lease).map(String::as_str)
    }

    /// Frees the prover slot `lease` held, if any. Returns whether one was freed.
    pub fn free_slot(&mut self, lease: Uuid) -> bool {
        let Some(prover) = self.slots.remove(&lease) else { return false };
        if let Some(p) = self.workers.get_mut(&prover) {
            p.slots_used = p.slots_used.saturating_sub(1);
        }
        true
    }

    /// Connected workers as `(role, zone, count)`.
    pub fn census(&self) -> Vec<(Role, String, usize)> {
        let mut m: HashMap<(i32, String), usize> = HashMap::new();
        for c in self.workers.values() {
            *m.entry((c.role as i32, c.zone.clone())).or_default() += 1;
        }
        let mut v: Vec<_> =
            m.into_iter().map(|((r, z), n)| (Role::try_from(r).unwrap_or(Role::Unspecified), z, n)).collect();
        v.sort_by(|a, b| (a.0 as i32, &a.1).cmp(&(b.0 as i32, &b.1)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: &str, role: Role, zone: &str, host: &str, capacity: u32) -> Conn {
        let (outbox, _) = mpsc::channel(1);
        Conn {
            id: id.into(),
            name: id.into(),
            role,
            zone: zone.into(),
            region: "r".into(),
            host: host.into(),
            capacity,
            prover_endpoint: format!("http://{id}"),
            versions: vec![],
            prover_group: None,
            pairs: vec![],
            memory_budget_mib: 0,
            loaded_setups: vec![],
            credits: 1,
            held: HashMap::new(),
            slots_used: 0,
            reported_busy: 0,
            draining: false,
            drained: false,
            identity: None,
            quarantined: false,
            outbox,
            instance: String::new(),
            ended: Default::default(),
        }
    }

    #[test]
    fn same_host_then_same_zone_and_never_across_zones_by_default() {
        let mut r = Registry::default();
        r.add(conn("wvg", Role::Wvg, "a", "h1", 4));
        r.add(conn("p-b", Role::Prover, "b", "h3", 8));
        r.add(conn("p-a-other", Role::Prover, "a", "h2", 1));
        r.add(conn("p-a-local", Role::Prover, "a", "h1", 1));
        let wvg = || r.get("wvg").unwrap();
        assert_eq!(r.provers_for(wvg(), ZonePolicy::SameZoneOnly).first().map(String::as_str), Some("p-a-local"));
        let l1 = Uuid::new_v4();
        r.hold_slot("p-a-local", l1);
        let wvg = || r.get("wvg").unwrap();
        assert_eq!(r.provers_for(wvg(), ZonePolicy::SameZoneOnly).first().map(String::as_str), Some("p-a-other"));
        r.hold_slot("p-a-other", Uuid::new_v4());
        // Zone a is full: the zone-b prover is free but never picked under the default policy.
        let wvg = || r.get("wvg").unwrap();
        assert_eq!(r.provers_for(wvg(), ZonePolicy::SameZoneOnly).first().map(String::as_str), None);
        assert_eq!(r.provers_for(wvg(), ZonePolicy::CrossZoneWhenNoneFree).first().map(String::as_str), Some("p-b"));
        // A slot freed in zone a is preferred again.
        assert!(r.free_slot(l1));
        let wvg = r.get("wvg").unwrap();
        assert_eq!(r.provers_for(wvg, ZonePolicy::CrossZoneWhenNoneFree).first().map(String::as_str), Some("p-a-local"));
    }

    #[test]
    fn a_wvg_is_matched_only_with_a_prover_of_a_version_it_proves() {
        let mut r = Registry::default();
        let mut wvg = conn("wvg", Role::Wvg, "a", "h1", 1);
        wvg.versions = vec![65536];
        r.add(wvg);
        let mut other = conn("p-new", Role::Prover, "a", "h1", 4);
        other.versions = vec![65537];
        r.add(other);
        let mut same = conn("p-old", Role::Prover, "a", "h2", 1);
        same.versions = vec![65536, 65537];
        r.add(same);
        // The other version's prover is local and has more slots, but proves none of the WVG's versions.
        assert_eq!(r.provers_for(r.get("wvg").unwrap(), ZonePolicy::SameZoneOnly).first().map(String::as_str), Some("p-old"));
        r.hold_slot("p-old", Uuid::new_v4());
        assert_eq!(r.provers_for(r.get("wvg").unwrap(), ZonePolicy::SameZoneOnly).first(), None);
    }

    #[test]
    fn held_leases_bound_the_grantable_credits_until_reported_taken_over_or_left_unrenewed() {
        let mut r = Registry::default();
        let mut wvg = conn("wvg", Role::Wvg, "a", "h1", 2);
        wvg.credits = 2;
        r.add(wvg);
        r.add(conn("p", Role::Prover, "a", "h1", 4));
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        r.hold_lease("wvg", a);
        r.hold_lease("wvg", b);
        assert_eq!(r.get("wvg").unwrap().grantable(), 0);
        assert!(r.ready().is_empty());
        // The prover took `a` over (its heartbeat named it): the WVG may take one more.
        assert!(r.heard_leases("p", &[a], Duration::from_secs(60)));
        assert_eq!(r.get("wvg").unwrap().grantable(), 1);
        assert_eq!(r.ready(), vec!["wvg".to_string()]);
        // Its own heartbeat renews `b`; one that leaves it out drops it only after the limit.
        assert!(!r.heard_leases("wvg", &[b], Duration::from_secs(60)));
        assert!(!r.heard_leases("wvg", &[], Duration::from_secs(60)));
        assert!(r.heard_leases("wvg", &[], Duration::ZERO));
        assert_eq!(r.get("wvg").unwrap().grantable(), 2);
        // A lease ended twice (a report, then its recorded end) is released once; a removed
        // connection's leases leave the index with it.
        r.hold_lease("wvg", a);
        assert!(r.release_lease(a));
        assert!(!r.release_lease(a));
        r.hold_lease("wvg", b);
        r.remove("wvg");
        assert!(!r.release_lease(b));
    }
}
