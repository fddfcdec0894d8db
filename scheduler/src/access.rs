//! Who may call what (`docs/security.md`). With TLS on, every connection has a certificate
//! identity ([`proofmesh_proto::PeerIdentity`]): any identity the CA signed may work (`Scheduler`)
//! and submit (`Batches`); `Admin` read methods need an operator or admin identity, changes an
//! admin identity (`--operator-subject`, `--admin-subject`: subject patterns such as `CN=alice`
//! or `OU=proofmesh-admins`). With TLS off, every client may do everything and is named
//! [`ANONYMOUS`] in the audit log.

use proofmesh_proto::{peer_identity, SubjectPattern};
use tonic::{Request, Status};

/// The caller's name in the audit log when the scheduler runs without TLS.
pub const ANONYMOUS: &str = "anonymous (TLS off)";

/// The roles' subject patterns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AccessPolicy {
    /// Identities that may read and change (`--admin-subject`).
    pub admins: Vec<SubjectPattern>,
    /// Identities that may read (`--operator-subject`).
    pub operators: Vec<SubjectPattern>,
}

/// What an `Admin` method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A read method: the operator or admin role.
    Read,
    /// A change: the admin role.
    Change,
}

impl AccessPolicy {
    /// The caller of `request` (its subject, or [`ANONYMOUS`]) if it may do what `need` says;
    /// `tls`: the server runs with TLS. Errors: `UNAUTHENTICATED` with TLS on and no identity;
    /// `PERMISSION_DENIED` naming the subject and the role needed otherwise.
    pub fn allow<T>(&self, request: &Request<T>, need: Need, tls: bool) -> Result<String, Status> {
        let Some(identity) = peer_identity(request) else {
            return if tls { Err(Status::unauthenticated("no client certificate")) } else { Ok(ANONYMOUS.to_string()) };
        };
        let admin = self.admins.iter().any(|p| identity.matches(p));
        let operator = admin || self.operators.iter().any(|p| identity.matches(p));
        match need {
            Need::Change if admin => Ok(identity.subject().to_string()),
            Need::Read if operator => Ok(identity.subject().to_string()),
            Need::Change => Err(Status::permission_denied(format!(
                "{} is not an admin (the scheduler's --admin-subject): this method changes the cluster",
                identity.subject()
            ))),
            Need::Read => Err(Status::permission_denied(format!(
                "{} is neither an operator nor an admin (the scheduler's --operator-subject, --admin-subject)",
                identity.subject()
            ))),
        }
    }
}
