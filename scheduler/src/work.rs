//! `Scheduler.Work`: one bidirectional stream per worker. The worker registers, grants credits,
//! heartbeats and reports completions and failures; the scheduler answers with leases (pushed by
//! the dispatcher) and with `Refused` for a report it did not record.

use std::pin::Pin;
use std::sync::Arc;

use proofmesh_core::CircuitId;
use proofmesh_proto::v1::{self, scheduler_message, worker_message, Role};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::db::{self, DbError};
use crate::registry::{Conn, Outbox};
use crate::state::Shared;

/// The `Scheduler` service.
#[derive(Debug, Clone)]
pub struct WorkService {
    shared: Arc<Shared>,
}

impl WorkService {
    /// The service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        WorkService { shared }
    }
}

type SchedulerStream = Pin<Box<dyn Stream<Item = Result<v1::SchedulerMessage, Status>> + Send>>;

/// Room for the messages in flight to one worker (leases never exceed its credits).
const OUTBOX_DEPTH: usize = 1024;

fn role_name(role: Role) -> &'static str {
    match role {
        Role::WitnessGenerator => "witness-generator",
        Role::Wvg => "wvg",
        Role::Prover => "prover",
        Role::Compressor => "compressor",
        Role::Unspecified => "unspecified",
    }
}

#[tonic::async_trait]
impl v1::scheduler_server::Scheduler for WorkService {
    type WorkStream = SchedulerStream;

    async fn work(&self, request: Request<Streaming<v1::WorkerMessage>>) -> Result<Response<SchedulerStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.and_then(|m| m.msg);
        let Some(worker_message::Msg::Register(reg)) = first else {
            return Err(Status::invalid_argument("the first message on a Work stream must be Register"));
        };
        let role = Role::try_from(reg.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(Status::invalid_argument("Register.role is required"));
        }
        if role == Role::Prover && (reg.prover_endpoint.is_empty() || reg.capacity == 0) {
            return Err(Status::invalid_argument("a prover must register its prover_endpoint and a capacity >= 1"));
        }
        let id = format!("{}-{}", role_name(role), &Uuid::new_v4().simple().to_string()[..12]);
        let name = if reg.name.is_empty() { id.clone() } else { reg.name.clone() };
        let endpoint = (!reg.prover_endpoint.is_empty()).then_some(reg.prover_endpoint.as_str());
        db::register_worker(
            &self.shared.pool,
            &id,
            &name,
            role_name(role),
            &reg.zone,
            &reg.region,
            &reg.host,
            reg.capacity,
            endpoint,
        )
        .await
        .map_err(internal)?;

        let (outbox, rx) = mpsc::channel(OUTBOX_DEPTH);
        let registered = v1::Registered { worker_id: id.clone(), heartbeat_interval_ms: self.shared.settings.heartbeat_ms };
        outbox
            .try_send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Registered(registered)) }))
            .map_err(|_| Status::internal("worker outbox closed"))?;
        self.shared.registry().add(Conn {
            id: id.clone(),
            name: name.clone(),
            role,
            zone: reg.zone.clone(),
            host: reg.host.clone(),
            capacity: reg.capacity,
            prover_endpoint: reg.prover_endpoint.clone(),
            versions: reg.protocol_versions.iter().map(|v| (v.minor * 65536 + v.patch) as i32).collect(),
            credits: 0,
            slots_used: 0,
            outbox: outbox.clone(),
        });
        tracing::info!(worker = %id, name, role = role_name(role), zone = reg.zone, host = reg.host, "registered");
        self.shared.wake_dispatcher();

        let shared = self.shared.clone();
        tokio::spawn(async move {
            let end = serve_worker(&shared, &id, &mut inbound, &outbox).await;
            shared.registry().remove(&id);
            match db::release_worker(&shared.pool, &id).await {
                Ok(released) => {
                    for (lease, batch) in released {
                        // A WVG's lease held a prover slot: the job is queued again, the slot is free.
                        shared.registry().free_slot(lease);
                        shared.batch_changed(batch);
                    }
                }
                Err(e) => tracing::error!(worker = %id, "releasing its leases: {e}"),
            }
            tracing::info!(worker = %id, "disconnected: {end}");
            shared.wake_dispatcher();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn internal(e: DbError) -> Status {
    Status::internal(e.to_string())
}

/// Handles one worker's messages until its stream ends. Returns why it ended.
async fn serve_worker(shared: &Shared, id: &str, inbound: &mut Streaming<v1::WorkerMessage>, outbox: &Outbox) -> String {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m.msg,
            Ok(None) => return "stream closed".into(),
            Err(e) => return format!("stream error: {e}"),
        };
        let result = match msg {
            Some(worker_message::Msg::Credit(c)) => {
                if let Some(conn) = shared.registry().get_mut(id) {
                    conn.credits = conn.credits.saturating_add(c.n);
                }
                shared.wake_dispatcher();
                Ok(())
            }
            Some(worker_message::Msg::Heartbeat(_)) => {
                db::renew(&shared.pool, id, shared.settings.lease_secs).await.map(|_| ())
            }
            Some(worker_message::Msg::Completed(c)) => completed(shared, id, c, outbox).await,
            Some(worker_message::Msg::Failed(f)) => failed(shared, id, f, outbox).await,
            Some(worker_message::Msg::Register(_)) | None => {
                refuse(outbox, "", "unexpected message (Register is only the first message)").await;
                Ok(())
            }
        };
        if let Err(e) = result {
            tracing::error!(worker = %id, "{e}");
        }
    }
}

async fn refuse(outbox: &Outbox, lease: &str, reason: &str) {
    let msg = v1::Refused { lease_id: lease.into(), reason: reason.into() };
    let _ = outbox.send(Ok(v1::SchedulerMessage { msg: Some(scheduler_message::Msg::Refused(msg)) })).await;
}

fn parse_lease(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s).ok()
}

async fn completed(shared: &Shared, worker: &str, c: v1::Completed, outbox: &Outbox) -> Result<(), DbError> {
    let Some(lease) = parse_lease(&c.lease_id) else {
        refuse(outbox, &c.lease_id, "not a lease id").await;
        return Ok(());
    };
    let counts: Vec<(CircuitId, u32)> = c
        .circuits
        .iter()
        .filter_map(|cc| u8::try_from(cc.circuit_id).ok().map(|id| (CircuitId(id), cc.count)))
        .collect();
    match db::complete(&shared.pool, lease, &counts, c.compute_secs, shared.settings.max_attempts).await {
        Ok(done) => {
            tracing::debug!(worker, %lease, queued = done.queued, "completed");
            if done.batch_proven {
                tracing::info!(batch = done.batch_number, "batch proven");
            }
            shared.registry().free_slot(lease);
            shared.batch_changed(done.batch_number);
            shared.wake_dispatcher();
            Ok(())
        }
        Err(DbError::StaleLease(_)) => {
            tracing::warn!(worker, %lease, "stale completion refused");
            if shared.registry().free_slot(lease) {
                shared.wake_dispatcher();
            }
            refuse(outbox, &c.lease_id, "stale lease: the job was leased again or already completed").await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn failed(shared: &Shared, worker: &str, f: v1::Failed, outbox: &Outbox) -> Result<(), DbError> {
    let Some(lease) = parse_lease(&f.lease_id) else {
        refuse(outbox, &f.lease_id, "not a lease id").await;
        return Ok(());
    };
    shared.registry().free_slot(lease);
    match db::fail(&shared.pool, lease, &f.error, f.retryable).await {
        Ok(batch) => {
            tracing::warn!(worker, %lease, retryable = f.retryable, "job failed: {}", f.error);
            shared.batch_changed(batch);
            shared.wake_dispatcher();
            Ok(())
        }
        Err(DbError::StaleLease(_)) => {
            shared.wake_dispatcher();
            refuse(outbox, &f.lease_id, "stale lease").await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}
