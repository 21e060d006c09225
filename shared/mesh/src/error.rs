//! The one small vocabulary of errors every Bulkhead service answers with, each
//! mapped once to a gRPC status. Internal detail is logged on the server and
//! never sent to the caller.

use std::fmt;

/// A service error. Messages are lowercase, say what the caller can fix, and
/// never hold a secret value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed or out of bounds.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The caller may not do this (wrong identity, wrong tenant).
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller has no usable identity.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The system is not in a state that allows this (revoked, unapproved, stale epoch).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound or rate limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (audit, a store, a backend) cannot serve; retrying may work.
    /// The detail is logged, the caller sees only `what`.
    #[error("{what} unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// A bug or an unexpected failure; the detail is logged, never sent.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl fmt::Display) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.to_string(),
        }
    }

    pub fn denied(msg: impl Into<String>) -> Self {
        Error::PermissionDenied(msg.into())
    }

    pub fn unavailable(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Unavailable {
            what,
            source: Some(source.into()),
        }
    }

    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Internal(source.into())
    }

    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Unavailable { .. } => tonic::Code::Unavailable,
            Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match &err {
            Error::Internal(source) => {
                tracing::error!(error = %source, "internal error");
            }
            Error::Unavailable {
                what,
                source: Some(source),
            } => {
                tracing::warn!(dependency = what, error = %source, "dependency unavailable");
            }
            Error::PermissionDenied(msg) => {
                tracing::info!(reason = %msg, "permission denied");
            }
            _ => {}
        }
        tonic::Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_is_not_sent() {
        let err = Error::internal(std::io::Error::other("disk /var/lib/x exploded"));
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), "internal error");

        let err = Error::unavailable(
            "audit",
            std::io::Error::other("connection refused 10.1.2.3"),
        );
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "audit unavailable");
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status: tonic::Status = Error::invalid("labels", "more than 64").into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "invalid labels: more than 64");
    }
}
