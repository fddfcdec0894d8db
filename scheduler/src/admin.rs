//! `Admin`, for operators: batches with progress per round, jobs, connected workers and the
//! queue depth; requeue a stuck job, cancel a batch, set a batch's priority, drain a worker.
//! With TLS, reads need an operator identity and changes an admin identity ([`crate::access`]).
//! Every change (allowed or not) goes to the audit log (`audit_log`, `ListAuditLog`) with who
//! asked and how it ended, is logged (`admin:` lines at WARN) and wakes the dispatcher.

use std::sync::Arc;

use proofmesh_core::ProtocolVersion;
use proofmesh_proto::v1;
use tonic::{Request, Response, Status};

use crate::access::Need;
use crate::batches::{batch_status, internal, to_status};
use crate::db::{self, JobFilter, JobRow, Requeue};
use crate::graph::JobKind;
use crate::state::Shared;

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    /// The service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        AdminService { shared }
    }

    /// The caller of `request` if it may do what `need` says (see [`crate::access`]).
    fn allow<T>(&self, request: &Request<T>, need: Need) -> Result<String, Status> {
        self.shared.settings.access.allow(request, need, self.shared.settings.tls.enabled())
    }

    /// Runs the change `method` for an admin, recording it in the audit log with `details` and
    /// its outcome; a caller without the admin role is refused and recorded too.
    async fn change<T, R>(
        &self,
        request: Request<T>,
        method: &str,
        details: impl FnOnce(&T) -> String,
        run: impl AsyncFnOnce(T) -> Result<R, Status>,
    ) -> Result<Response<R>, Status> {
        let allowed = self.allow(&request, Need::Change);
        let caller = match &allowed {
            Ok(c) => c.clone(),
            Err(_) => proofmesh_proto::peer_identity(&request).map_or_else(|| crate::access::ANONYMOUS.into(), |i| i.subject().to_string()),
        };
        let args = request.into_inner();
        // The caller's text is kept to a bounded length (and without NUL, which PostgreSQL
        // refuses), so neither a refused call nor an allowed one can grow the log by more.
        let details = db::storable_text(&details(&args)).into_owned();
        let result = match allowed {
            Ok(_) => run(args).await,
            Err(e) => Err(e),
        };
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => db::storable_text(&format!("{:?}: {}", e.code(), e.message())).into_owned(),
        };
        tracing::warn!(caller, method, details, outcome, "admin: audit");
        if let Err(e) = db::audit(&self.shared.pool, &caller, method, &details, &outcome).await {
            // The change is made (or refused) already; the log line above still names it.
            tracing::error!(caller, method, "writing the audit log: {e}");
        }
        result.map(Response::new)
    }

    async fn status(&self, number: i64) -> Result<v1::BatchStatus, Status> {
        batch_status(&self.shared, number)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("batch {number} was never submitted")))
    }
}

const STATUSES: [&str; 5] = {
    use crate::job_state::JobStatus as S;
    [S::Waiting.as_str(), S::Queued.as_str(), S::Leased.as_str(), S::Succeeded.as_str(), S::Failed.as_str()]
};

fn ms(v: Option<i64>) -> u64 {
    v.unwrap_or(0).max(0) as u64
}

fn job_message(j: JobRow) -> v1::Job {
    v1::Job {
        id: j.id as u64,
        job: Some(j.job.to_proto()),
        protocol_version: Some(j.job.version()),
        status: j.status,
        attempts: j.attempts as u32,
        max_attempts: j.max_attempts as u32,
        priority: j.priority,
        lease_id: j.lease_id.map(|l| l.to_string()).unwrap_or_default(),
        worker_id: j.leased_to.unwrap_or_default(),
        lease_deadline_unix_ms: ms(j.deadline_ms),
        error: j.error.unwrap_or_default(),
        queued_unix_ms: ms(j.queued_ms),
        leased_unix_ms: ms(j.leased_ms),
        finished_unix_ms: ms(j.finished_ms),
        compute_secs: j.compute_secs.unwrap_or(0.0),
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn list_batches(
        &self,
        request: Request<v1::ListBatchesRequest>,
    ) -> Result<Response<v1::ListBatchesResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let limit = match request.into_inner().limit {
            0 => 100,
            n => i64::from(n.min(10_000)),
        };
        let rows = db::batches(&self.shared.pool, limit).await.map_err(internal)?;
        let mut batches = Vec::with_capacity(rows.len());
        for row in rows {
            let rounds = db::rounds(&self.shared.pool, row.batch_number).await.map_err(internal)?;
            batches.push(to_status(row, rounds));
        }
        Ok(Response::new(v1::ListBatchesResponse { batches }))
    }

    async fn get_batch(&self, request: Request<v1::GetBatchRequest>) -> Result<Response<v1::BatchStatus>, Status> {
        self.allow(&request, Need::Read)?;
        Ok(Response::new(self.status(i64::from(request.into_inner().batch_number)).await?))
    }

    async fn list_jobs(&self, request: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let r = request.into_inner();
        if !r.status.is_empty() && !STATUSES.contains(&r.status.as_str()) {
            return Err(Status::invalid_argument(format!("status must be one of {STATUSES:?} or empty, not {:?}", r.status)));
        }
        let after_id = match r.page_token.as_str() {
            "" => 0,
            t => t.parse::<i64>().map_err(|_| Status::invalid_argument(format!("page_token {t:?} is not one this server gave")))?,
        };
        let limit = match r.page_size {
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let small = |v: Option<u32>, what: &str| {
            v.map(|x| i16::try_from(x).map_err(|_| Status::invalid_argument(format!("{what} {x} is out of range"))))
                .transpose()
        };
        let filter = JobFilter {
            batch: (r.batch_number != 0).then_some(i64::from(r.batch_number)),
            round: small(r.aggregation_round, "aggregation_round")?,
            circuit_id: small(r.circuit_id, "circuit_id")?,
            status: (!r.status.is_empty()).then_some(r.status),
            after_id,
            limit,
        };
        let rows = db::jobs(&self.shared.pool, &filter).await.map_err(internal)?;
        let next_page_token = if rows.len() as i64 == limit { rows.last().map(|j| j.id.to_string()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(v1::ListJobsResponse { jobs: rows.into_iter().map(job_message).collect(), next_page_token }))
    }

    async fn list_workers(&self, request: Request<v1::ListWorkersRequest>) -> Result<Response<v1::ListWorkersResponse>, Status> {
        self.allow(&request, Need::Read)?;
        Ok(Response::new(v1::ListWorkersResponse { workers: self.workers().await? }))
    }

    async fn get_queue_depth(
        &self,
        request: Request<v1::GetQueueDepthRequest>,
    ) -> Result<Response<v1::GetQueueDepthResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let (rows, oldest) = db::queue_depth(&self.shared.pool).await.map_err(internal)?;
        let depths = rows
            .into_iter()
            .map(|d| v1::QueueDepth {
                aggregation_round: d.aggregation_round as u32,
                circuit_id: d.circuit_id as u32,
                protocol_version: Some(db::proto_version(d.protocol_minor, d.protocol_patch)),
                kind: JobKind::parse(&d.kind).map_or(0, |k| k.to_proto() as i32),
                status: d.status,
                jobs: d.jobs as u32,
            })
            .collect();
        Ok(Response::new(v1::GetQueueDepthResponse { depths, oldest_queued_age_secs: oldest }))
    }
    async fn requeue_job(&self, request: Request<v1::RequeueJobRequest>) -> Result<Response<v1::Job>, Status> {
        let details = |r: &v1::RequeueJobRequest| format!("job {}: reason={:?}", r.job_id, r.reason);
        self.change(request, "RequeueJob", details, async |r| self.requeue(r).await).await
    }

    async fn cancel_batch(&self, request: Request<v1::CancelBatchRequest>) -> Result<Response<v1::BatchStatus>, Status> {
        let details = |r: &v1::CancelBatchRequest| format!("batch {}: reason={:?}", r.batch_number, r.reason);
        self.change(request, "CancelBatch", details, async |r| self.cancel(r).await).await
    }

    async fn set_batch_priority(
        &self,
        request: Request<v1::SetBatchPriorityRequest>,
    ) -> Result<Response<v1::BatchStatus>, Status> {
        let details = |r: &v1::SetBatchPriorityRequest| format!("batch {}: priority={}", r.batch_number, r.priority);
        self.change(request, "SetBatchPriority", details, async |r| self.set_priority(r).await).await
    }

    async fn drain_worker(&self, request: Request<v1::DrainWorkerRequest>) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let details = |r: &v1::DrainWorkerRequest| format!("worker {:?}", r.worker);
        self.change(request, "DrainWorker", details, async |r| self.drain(r).await).await
    }

    async fn list_protocol_versions(
        &self,
        request: Request<v1::ListProtocolVersionsRequest>,
    ) -> Result<Response<v1::ListProtocolVersionsResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let rows = db::protocol_versions(&self.shared.pool).await.map_err(internal)?;
        let versions = rows.into_iter().map(|r| self.version_info(r)).collect();
        Ok(Response::new(v1::ListProtocolVersionsResponse { versions }))
    }

    async fn register_protocol_version(
        &self,
        request: Request<v1::RegisterProtocolVersionRequest>,
    ) -> Result<Response<v1::ProtocolVersionInfo>, Status> {
        let details = |r: &v1::RegisterProtocolVersionRequest| format!("version {:?}: vk_hash={}", r.version, r.vk_hash);
        self.change(request, "RegisterProtocolVersion", details, async |r| self.register_version(r).await).await
    }

    async fn retire_protocol_version(
        &self,
        request: Request<v1::RetireProtocolVersionRequest>,
    ) -> Result<Response<v1::ProtocolVersionInfo>, Status> {
        let details = |r: &v1::RetireProtocolVersionRequest| format!("version {:?}", r.version);
        self.change(request, "RetireProtocolVersion", details, async |r| self.retire_version(r).await).await
    }

    async fn release_worker(&self, request: Request<v1::ReleaseWorkerRequest>) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let details = |r: &v1::ReleaseWorkerRequest| format!("worker {:?}", r.worker);
        self.change(request, "ReleaseWorker", details, async |r| self.release(r).await).await
    }

    async fn list_audit_log(
        &self,
        request: Request<v1::ListAuditLogRequest>,
    ) -> Result<Response<v1::ListAuditLogResponse>, Status> {
        self.allow(&request, Need::Read)?;
        let limit = match request.into_inner().limit {
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let rows = db::audit_log(&self.shared.pool, limit).await.map_err(internal)?;
        let entries = rows
            .into_iter()
            .map(|r| v1::AuditEntry {
                id: r.id as u64,
                at_unix_ms: r.at_ms.max(0) as u64,
                identity: r.identity,
                method: r.method,
                details: r.details,
                outcome: r.outcome,
            })
            .collect();
        Ok(Response::new(v1::ListAuditLogResponse { entries }))
    }
}

/// The changes, run once `change` allowed them.
impl AdminService {
    async fn requeue(&self, r: v1::RequeueJobRequest) -> Result<v1::Job, Status> {
        let id = i64::try_from(r.job_id).map_err(|_| Status::invalid_argument("job_id out of range"))?;
        let reason = format!("requeued by an operator: {}", if r.reason.is_empty() { "no reason given" } else { &r.reason });
        match db::requeue(&self.shared.pool, id, &reason).await.map_err(internal)? {
            Requeue::NotFound => return Err(Status::not_found(format!("no job {id}"))),
            Requeue::NotLeased(status) => {
                return Err(Status::failed_precondition(format!("job {id} is {status}: only a leased job can be requeued")))
            }
            Requeue::Requeued(taken, batch) => {
                tracing::warn!(job = id, lease = %taken.lease_id, holder = taken.holder.as_deref().unwrap_or(""), "admin: {reason}");
                self.shared.apply(taken.end(batch, &reason));
            }
        }
        let job = db::job(&self.shared.pool, id).await.map_err(internal)?.ok_or_else(|| Status::not_found(format!("no job {id}")))?;
        Ok(job_message(job))
    }

    async fn cancel(&self, r: v1::CancelBatchRequest) -> Result<v1::BatchStatus, Status> {
        let number = i64::from(r.batch_number);
        let error = format!("cancelled by an operator: {}", if r.reason.is_empty() { "no reason given" } else { &r.reason });
        let Some(taken) = db::cancel_batch(&self.shared.pool, number, &error).await.map_err(internal)? else {
            let status = self.status(number).await?;
            return Err(Status::failed_precondition(format!(
                "batch {number} is {}: only a proving batch can be cancelled",
                v1::BatchState::try_from(status.state).map_or("unknown", |s| s.as_str_name())
            )));
        };
        tracing::warn!(batch = number, leases_revoked = taken.len(), "admin: {error}");
        for t in &taken {
            self.shared.apply(t.end(number, &error));
        }
        self.shared.batch_changed(number);
        self.status(number).await
    }

    async fn set_priority(&self, r: v1::SetBatchPriorityRequest) -> Result<v1::BatchStatus, Status> {
        let number = i64::from(r.batch_number);
        if !db::set_batch_priority(&self.shared.pool, number, r.priority, self.shared.settings.policy.ageing_secs).await.map_err(internal)? {
            return Err(Status::not_found(format!("batch {number} was never submitted")));
        }
        tracing::warn!(batch = number, priority = r.priority, "admin: batch priority set");
        self.shared.wake_dispatcher();
        self.status(number).await
    }

    async fn drain(&self, r: v1::DrainWorkerRequest) -> Result<v1::ListWorkersResponse, Status> {
        let who = r.worker;
        let drained = self.shared.registry().drain(&who);
        if drained.is_empty() {
            return Err(Status::not_found(format!("no connected worker has the id or name {who:?}")));
        }
        // Kept by name: a reconnect, or a scheduler restart, finds it drained again.
        for (_, name, identity) in &drained {
            db::drain_worker(&self.shared.pool, name, identity.as_deref()).await.map_err(internal)?;
        }
        let ids: Vec<&String> = drained.iter().map(|(id, _, _)| id).collect();
        tracing::warn!(worker = who, connections = ?ids, "admin: worker drained (until Admin.ReleaseWorker)");
        let workers = self.workers().await?.into_iter().filter(|w| ids.contains(&&w.id)).collect();
        Ok(v1::ListWorkersResponse { workers })
    }

    async fn register_version(&self, r: v1::RegisterProtocolVersionRequest) -> Result<v1::ProtocolVersionInfo, Status> {
        let (minor, patch) = version_arg(r.version.as_ref())?;
        let hash = r.vk_hash.to_ascii_lowercase();
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "vk_hash must be 64 hex digits (the final circuit's verification key hash), not {:?}",
                r.vk_hash
            )));
        }
        let row = db::register_version(&self.shared.pool, minor, patch, &hash).await.map_err(internal)?;
        tracing::warn!(version = format!("0.{minor}.{patch}"), vk_hash = hash, "admin: protocol version registered");
        self.shared.wake_dispatcher();
        Ok(self.version_info(row))
    }

    async fn retire_version(&self, r: v1::RetireProtocolVersionRequest) -> Result<v1::ProtocolVersionInfo, Status> {
        let (minor, patch) = version_arg(r.version.as_ref())?;
        let row = db::retire_version(&self.shared.pool, minor, patch)
            .await
            .map_err(internal)?
            .ok_or_else(|| Status::not_found(format!("protocol version 0.{minor}.{patch} is not registered")))?;
        tracing::warn!(version = format!("0.{minor}.{patch}"), unfinished_batches = row.unfinished_batches, "admin: protocol version retired");
        Ok(self.version_info(row))
    }

    /// The connected workers, with their activity from the database.
    async fn workers(&self) -> Result<Vec<v1::Worker>, Status> {
        let mut workers: Vec<v1::Worker> = self
            .shared
            .registry()
            .all()
            .into_iter()
            .map(|c| v1::Worker {
                id: c.id.clone(),
                name: c.name.clone(),
                role: c.role as i32,
                zone: c.zone.clone(),
                region: c.region.clone(),
                host: c.host.clone(),
                capacity: c.capacity,
                credits: c.credits,
                slots_used: c.busy(),
                leases_held: 0,
                last_heartbeat_unix_ms: 0,
                draining: c.draining || c.drained,
                prover_endpoint: c.prover_endpoint.clone(),
                prover_group: c.prover_group,
                protocol_versions: c.versions.iter().map(|&v| ProtocolVersion::from_packed(v as u32).into()).collect(),
                memory_budget_mib: c.memory_budget_mib,
                memory_used_mib: 0,
                loaded_setups: c.loaded_setups.iter().map(|&p| crate::groups::unpack(p)).collect(),
                identity: c.identity.clone().unwrap_or_default(),
                strikes: 0,
                quarantined: c.quarantined,
            })
            .collect();
        let ids: Vec<String> = workers.iter().map(|w| w.id.clone()).collect();
        for (id, seen_ms, held, mib) in db::worker_activity(&self.shared.pool, &ids).await.map_err(internal)? {
            if let Some(w) = workers.iter_mut().find(|w| w.id == id) {
                w.last_heartbeat_unix_ms = seen_ms.max(0) as u64;
                w.leases_held = held as u32;
                w.memory_used_mib = mib.max(0) as u64;
            }
        }
        let names: Vec<String> = workers.iter().map(|w| w.name.clone()).collect();
        for (name, n) in db::strikes(&self.shared.pool, &names).await.map_err(internal)? {
            for w in workers.iter_mut().filter(|w| w.name == name) {
                w.strikes = n as u32;
            }
        }
        Ok(workers)
    }

    async fn release(&self, r: v1::ReleaseWorkerRequest) -> Result<v1::ListWorkersResponse, Status> {
        let (quarantined, drained) = db::release_worker(&self.shared.pool, &r.worker).await.map_err(internal)?;
        if !quarantined && !drained {
            return Err(Status::not_found(format!("worker {:?} is neither quarantined nor drained", r.worker)));
        }
        {
            let mut registry = self.shared.registry();
            registry.quarantine(&r.worker, false);
            registry.undrain(&r.worker);
        }
        tracing::warn!(worker = r.worker, quarantined, drained, "admin: worker released");
        self.shared.wake_dispatcher();
        let workers = self.workers().await?.into_iter().filter(|w| w.name == r.worker).collect();
        Ok(v1::ListWorkersResponse { workers })
    }
}

/// A request's protocol version as `(minor, patch)`. Errors: missing, or out of range.
fn version_arg(v: Option<&v1::ProtocolVersion>) -> Result<(i32, i32), Status> {
    let v = v.and_then(|v| v.to_core()).ok_or_else(|| Status::invalid_argument("version is required (minor and patch < 65536)"))?;
    Ok((i32::from(v.minor), i32::from(v.patch)))
}

impl AdminService {
    /// A version row with the connected workers that prove it (declared it, or declared none).
    fn version_info(&self, r: db::VersionRow) -> v1::ProtocolVersionInfo {
        let packed = ProtocolVersion { minor: r.minor as u16, patch: r.patch as u16 }.packed() as i32;
        let mut workers = std::collections::HashMap::new();
        for c in self.shared.registry().all() {
            if c.versions.is_empty() || c.versions.contains(&packed) {
                *workers.entry(crate::work::role_name(c.role).to_string()).or_insert(0u32) += 1;
            }
        }
        v1::ProtocolVersionInfo {
            version: Some(db::proto_version(r.minor, r.patch)),
            vk_hash: r.vk_hash,
            status: r.status,
            registered_at_unix_ms: r.registered_ms.max(0) as u64,
            unfinished_batches: r.unfinished_batches as u32,
            queued_jobs: r.queued_jobs as u32,
            workers,
        }
    }
}
