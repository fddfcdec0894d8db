//! The connected workers: the only state the scheduler keeps in memory (it is rebuilt by the
//! workers reconnecting). Holds each worker's credits (leases it can still take), each prover's
//! free slots, and which prover slot each WVG lease holds.

use std::collections::HashMap;

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
    /// Leases it can still take.
    pub credits: u32,
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

    /// Removes a worker; the slots its WVG leases held on provers are freed.
    pub fn remove(&mut self, id: &str) -> Option<Conn> {
        let conn = self.workers.remove(id)?;
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

    /// Workers that take leases (not provers) and have credits, by id.
    pub fn ready(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .workers
            .values()
            .filter(|c| c.credits > 0 && c.role != Role::Prover && c.takes_work())
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
}
