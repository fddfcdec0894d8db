//! The job state machine: every status a job, a lease and a batch can be in, and every
//! transition between them, as types without I/O. The SQL in [`crate::db`] takes its state
//! names from here (the `lit` constants, spliced into the statements' text at compile time), and
//! each transition's effects outside the database (a prover slot freed, a lease revoked, a
//! metric, the dispatcher woken) are applied by one function, [`crate::state::Shared::apply`].
//!
//! Modelled on River's `JobState` (riverqueue/river `rivertype`): each state's doc says which
//! part of the scheduler moves a job into it and out of it.
//!
//! ```text
//!            Ready                Lease
//!  waiting ---------> queued ------------> leased --Complete--> succeeded
//!     ^                 ^  ^                 |  |                   |
//!     |   AwaitInputs   |  +-----------------+  |                   | Reject (the next round found
//!     +-----------------|--- Unsend, HandBack,  +--Fail/Expire-->   |  its proof does not verify)
//!                       |    Requeue, Fail/Expire   (no attempts    |
//!                       |    (attempts left)         left) failed   |
//!                       +-------------------------------------------+
//!  waiting | queued | leased --FailWithBatch--> failed   (the batch failed or was cancelled)
//!  queued --Complete--> succeeded                         (a late result of an expired lease)
//! ```

/// A job's status (`jobs.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// An input is not done. In: the job graph's insertion (`db::complete` of the round-0
    /// witness generation); [`Transition::AwaitInputs`]. Out: [`Transition::Ready`] when its
    /// last input succeeds; [`Transition::FailWithBatch`].
    Waiting,
    /// Ready to lease. In: submission (the round-0 witness generation), the graph's insertion
    /// (jobs without inputs), [`Transition::Ready`], and every way a lease ends that gives the
    /// job another try. Out: [`Transition::Lease`] (the dispatcher); a late result
    /// ([`Transition::Complete`]); [`Transition::FailWithBatch`].
    Queued,
    /// A lease is out (`jobs.lease_id`, `leased_to`, `lease_deadline`). In: the dispatcher.
    /// Out: the holder's report (`work.rs`), the expiry timer (`expiry.rs`), an operator
    /// (`admin.rs`), a dispatch that could not be sent.
    Leased,
    /// Its output is stored and recorded. In: [`Transition::Complete`]. Out: only
    /// [`Transition::Reject`] (the next round found its proof invalid).
    Succeeded,
    /// For good: its attempts are spent, its batch failed, or it was cancelled. Terminal.
    Failed,
}

impl JobStatus {
    /// Every status.
    pub const ALL: [JobStatus; 5] = [Self::Waiting, Self::Queued, Self::Leased, Self::Succeeded, Self::Failed];

    /// The `jobs.status` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Queued => "queued",
            Self::Leased => "leased",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// The inverse of [`JobStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether the job is done with (no transition leads out, but [`Transition::Reject`]).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// How a lease ended (`leases.outcome`; NULL while it is out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseOutcome {
    /// Its result was recorded: the job succeeded through it (at most one per job: a partial
    /// unique index).
    Succeeded,
    /// Its worker reported a failure.
    Failed,
    /// Its worker gave it back unfinished (drain): not a failure, no attempt spent.
    HandedBack,
    /// Its deadline passed without a heartbeat. A result may still come (a late result), and
    /// is accepted if the job has not succeeded otherwise.
    Expired,
    /// It never reached its worker (the worker left between the grant and the send).
    Unsent,
    /// Another lease of the job succeeded first, or an operator requeued or cancelled it.
    Superseded,
    /// It succeeded, then the next round found its proof invalid: the job is proven again.
    Rejected,
}

impl LeaseOutcome {
    /// Every outcome.
    pub const ALL: [LeaseOutcome; 7] =
        [Self::Succeeded, Self::Failed, Self::HandedBack, Self::Expired, Self::Unsent, Self::Superseded, Self::Rejected];

    /// The `leases.outcome` value, also the `outcome` label of `proofmesh_jobs_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::HandedBack => "handed_back",
            Self::Expired => "expired",
            Self::Unsent => "unsent",
            Self::Superseded => "superseded",
            Self::Rejected => "rejected",
        }
    }

    /// The inverse of [`LeaseOutcome::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// Whether a result reported under a lease that ended so is still accepted: only an
    /// expired lease's (a late result; the first valid result of a job wins).
    pub fn accepts_late_result(self) -> bool {
        self == Self::Expired
    }
}

/// A batch's status (`batches.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchStatus {
    /// Submitted, not finished. In: `SubmitBatch`. Out: the compression job's success
    /// (proven), or any job failing for good / an operator's cancel (failed).
    Proving,
    /// Its final proof is stored (`batches.proof_key`). Terminal.
    Proven,
    /// A job failed for good, or an operator cancelled it (`batches.error`). Terminal.
    Failed,
}

impl BatchStatus {
    /// Every status.
    pub const ALL: [BatchStatus; 3] = [Self::Proving, Self::Proven, Self::Failed];

    /// The inverse of [`BatchStatus::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// The `batches.status` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Proving => "proving",
            Self::Proven => "proven",
            Self::Failed => "failed",
        }
    }
}

/// What a transition does to `jobs.attempts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempts {
    /// One more (a lease is granted: an attempt is counted when it starts).
    Spend,
    /// The attempt counted at the lease is given back: the job was not at fault (a hand-back,
    /// an unsent lease, an operator's requeue, a consumer sent back to wait for its inputs).
    GiveBack,
    /// Unchanged (the attempt stays spent, or none is involved).
    Keep,
}

/// Every transition of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The last unfinished input succeeded (`db::complete`).
    Ready,
    /// The dispatcher granted a lease.
    Lease,
    /// The granted lease could not be sent (its worker left).
    Unsend,
    /// A result was recorded (the current lease, or a late result of an expired one). A late
    /// result that supersedes a newer lease gives that lease's attempt back (the job did not
    /// fail; the cluster lost sight of it, e.g. in a scheduler outage).
    Complete,
    /// The holder reported a failure; `retry`: retryable and attempts are left.
    Fail {
        /// Queued again (retryable, under `max_attempts`), else failed for good.
        retry: bool,
    },
    /// The holder gave the lease back unfinished (drain).
    HandBack,
    /// The lease's deadline passed; `retry`: attempts are left.
    Expire {
        /// Queued again, else failed for good.
        retry: bool,
    },
    /// An operator took the lease away (`Admin.RequeueJob`).
    Requeue,
    /// The next round found this succeeded job's proof invalid: prove it again.
    Reject,
    /// The consumer of a rejected proof: back to waiting for its inputs.
    AwaitInputs,
    /// Its batch failed (another job failed for good, or an operator cancelled it).
    FailWithBatch,
}

impl Transition {
    /// Every transition (each variant, each flag value).
    pub const ALL: [Transition; 13] = [
        Self::Ready,
        Self::Lease,
        Self::Unsend,
        Self::Complete,
        Self::Fail { retry: true },
        Self::Fail { retry: false },
        Self::HandBack,
        Self::Expire { retry: true },
        Self::Expire { retry: false },
        Self::Requeue,
        Self::Reject,
        Self::AwaitInputs,
        Self::FailWithBatch,
    ];

    /// The statuses it applies to (the SQL's guard).
    pub fn from(self) -> &'static [JobStatus] {
        use JobStatus::*;
        match self {
            Self::Ready => &[Waiting],
            Self::Lease => &[Queued],
            Self::Unsend | Self::Fail { .. } | Self::HandBack | Self::Expire { .. } | Self::Requeue | Self::AwaitInputs => &[Leased],
            // A late result finds its job queued again, or leased to someone else.
            Self::Complete => &[Leased, Queued],
            Self::Reject => &[Succeeded],
            Self::FailWithBatch => &[Waiting, Queued, Leased],
        }
    }

    /// The status it leads to.
    pub fn to(self) -> JobStatus {
        use JobStatus::*;
        match self {
            Self::Ready | Self::Unsend | Self::HandBack | Self::Requeue | Self::Reject => Queued,
            Self::Fail { retry } | Self::Expire { retry } => {
                if retry {
                    Queued
                } else {
                    Failed
                }
            }
            Self::Lease => Leased,
            Self::Complete => Succeeded,
            Self::AwaitInputs => Waiting,
            Self::FailWithBatch => Failed,
        }
    }

    /// What it does to the job's attempts.
    pub fn attempts(self) -> Attempts {
        match self {
            Self::Lease => Attempts::Spend,
            Self::Unsend | Self::HandBack | Self::Requeue | Self::AwaitInputs => Attempts::GiveBack,
            _ => Attempts::Keep,
        }
    }

    /// How the lease it ends ends (`None`: it ends none, or, for [`Transition::FailWithBatch`],
    /// only a leased job's, as [`LeaseOutcome::Superseded`]).
    pub fn lease_outcome(self) -> Option<LeaseOutcome> {
        match self {
            Self::Ready | Self::Lease => None,
            Self::Unsend => Some(LeaseOutcome::Unsent),
            Self::Complete => Some(LeaseOutcome::Succeeded),
            Self::Fail { .. } | Self::AwaitInputs => Some(LeaseOutcome::Failed),
            Self::HandBack => Some(LeaseOutcome::HandedBack),
            Self::Expire { .. } => Some(LeaseOutcome::Expired),
            Self::Requeue | Self::FailWithBatch => Some(LeaseOutcome::Superseded),
            Self::Reject => Some(LeaseOutcome::Rejected),
        }
    }

    /// Whether the lease row stays on the job (`jobs.lease_id` kept): only a success keeps the
    /// winning lease (the fencing token of the result); every other end clears it.
    pub fn keeps_lease_id(self) -> bool {
        matches!(self, Self::Lease | Self::Complete)
    }

    /// Whether a WVG lease's prover slot is freed. Not when a lease is taken away from a
    /// prover that is proving it ([`crate::registry::Registry::lease_taken_away`]: it still
    /// holds the witness vector and the slot until it reports); every report frees it.
    pub fn frees_slot(self) -> bool {
        !matches!(self, Self::Ready | Self::Lease | Self::Reject)
    }

    /// Whether the job may be leasable afterwards, so the dispatcher must read the queued
    /// classes again.
    pub fn queues(self) -> bool {
        self.to() == JobStatus::Queued
    }
}

/// The SQL literals of the states (quoted), spliced into the statements of [`crate::db`] with
/// `const_format::formatcp!`, so no statement spells a state itself.
pub mod lit {
    use super::{BatchStatus, JobStatus, LeaseOutcome};
    use const_format::formatcp;

    /// `'waiting'`.
    pub const WAITING: &str = formatcp!("'{}'", JobStatus::Waiting.as_str());
    /// `'queued'`.
    pub const QUEUED: &str = formatcp!("'{}'", JobStatus::Queued.as_str());
    /// `'leased'`.
    pub const LEASED: &str = formatcp!("'{}'", JobStatus::Leased.as_str());
    /// `'succeeded'` (a job's status and a lease's outcome).
    pub const SUCCEEDED: &str = formatcp!("'{}'", JobStatus::Succeeded.as_str());
    /// `'failed'` (a job's, a lease's and a batch's).
    pub const FAILED: &str = formatcp!("'{}'", JobStatus::Failed.as_str());
    /// `'handed_back'`.
    pub const HANDED_BACK: &str = formatcp!("'{}'", LeaseOutcome::HandedBack.as_str());
    /// `'expired'`.
    pub const EXPIRED: &str = formatcp!("'{}'", LeaseOutcome::Expired.as_str());
    /// `'unsent'`.
    pub const UNSENT: &str = formatcp!("'{}'", LeaseOutcome::Unsent.as_str());
    /// `'superseded'`.
    pub const SUPERSEDED: &str = formatcp!("'{}'", LeaseOutcome::Superseded.as_str());
    /// `'rejected'`.
    pub const REJECTED: &str = formatcp!("'{}'", LeaseOutcome::Rejected.as_str());
    /// `'proving'`.
    pub const PROVING: &str = formatcp!("'{}'", BatchStatus::Proving.as_str());
    /// `'proven'`.
    pub const PROVEN: &str = formatcp!("'{}'", BatchStatus::Proven.as_str());
    /// The unfinished job statuses, as an SQL list: `('waiting', 'queued', 'leased')`.
    pub const UNFINISHED: &str = formatcp!("({WAITING}, {QUEUED}, {LEASED})");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_literals_quote_them() {
        for s in JobStatus::ALL {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
        for o in LeaseOutcome::ALL {
            assert_eq!(LeaseOutcome::parse(o.as_str()), Some(o));
        }
        assert_eq!(lit::QUEUED, "'queued'");
        assert_eq!(lit::HANDED_BACK, "'handed_back'");
        assert_eq!(lit::UNFINISHED, "('waiting', 'queued', 'leased')");
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn every_transition_leads_out_of_its_guard() {
        for t in Transition::ALL {
            assert!(!t.from().is_empty(), "{t:?} has no guard");
            assert!(!t.from().contains(&t.to()) || t == Transition::Complete, "{t:?} loops on {:?}", t.to());
        }
    }

    #[test]
    fn only_a_lease_spends_an_attempt_and_faults_not_the_jobs_give_it_back() {
        for t in Transition::ALL {
            let expected = match t {
                Transition::Lease => Attempts::Spend,
                Transition::HandBack | Transition::Unsend | Transition::Requeue | Transition::AwaitInputs => Attempts::GiveBack,
                _ => Attempts::Keep,
            };
            assert_eq!(t.attempts(), expected, "{t:?}");
        }
    }

    #[test]
    fn a_hand_back_is_its_own_outcome_and_queues_again() {
        let t = Transition::HandBack;
        assert_eq!(t.lease_outcome(), Some(LeaseOutcome::HandedBack));
        assert_ne!(t.lease_outcome(), Transition::Fail { retry: true }.lease_outcome());
        assert_eq!(t.to(), JobStatus::Queued);
        assert!(t.queues() && t.frees_slot());
    }

    #[test]
    fn failures_and_expiries_queue_again_only_with_attempts_left() {
        assert_eq!(Transition::Fail { retry: true }.to(), JobStatus::Queued);
        assert_eq!(Transition::Fail { retry: false }.to(), JobStatus::Failed);
        assert_eq!(Transition::Expire { retry: true }.to(), JobStatus::Queued);
        assert_eq!(Transition::Expire { retry: false }.to(), JobStatus::Failed);
        assert!(!Transition::Expire { retry: false }.queues());
    }

    #[test]
    fn finished_jobs_leave_only_by_rejection() {
        for t in Transition::ALL {
            if t.from().iter().any(|s| s.is_finished()) {
                assert_eq!(t, Transition::Reject);
                assert_eq!(t.from(), &[JobStatus::Succeeded]);
            }
        }
        assert!(Transition::ALL.iter().all(|t| !t.from().contains(&JobStatus::Failed)), "failed is terminal");
    }

    #[test]
    fn only_an_expired_lease_may_still_deliver() {
        for o in LeaseOutcome::ALL {
            assert_eq!(o.accepts_late_result(), o == LeaseOutcome::Expired, "{o:?}");
        }
    }

    #[test]
    fn a_success_keeps_the_winning_lease_every_other_end_clears_it() {
        for t in Transition::ALL {
            let ends_a_lease = t.from().contains(&JobStatus::Leased) && t != Transition::Complete;
            if ends_a_lease {
                assert!(!t.keeps_lease_id(), "{t:?}");
            }
        }
        assert!(Transition::Complete.keeps_lease_id());
    }
}
