//! Gantry's cluster protocol: the generated gRPC messages and services of `proto/gantry/v1`,
//! plus [`ClusterError`], the coordinator's domain errors and the gRPC status code each maps to.

/// Generated code of package `gantry.v1`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("gantry.v1");
}

pub mod tls;

use tonic::{Code, Status};

/// Metadata key of the join and operator tokens (`authorization: Bearer <token>`).
pub const AUTHORIZATION: &str = "authorization";

/// A client interceptor that adds `authorization: Bearer <token>` to every request.
#[derive(Debug, Clone)]
pub struct BearerToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl BearerToken {
    pub fn new(token: &str) -> Result<Self, ClusterError> {
        format!("Bearer {token}").parse().map(Self).map_err(|_| {
            ClusterError::InvalidArgument(
                "the token is not valid gRPC metadata (printable ASCII only)".into(),
            )
        })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.0.clone());
        Ok(request)
    }
}

/// A coordinator client that presents its [`BearerToken`] on every call.
pub type AuthorizedClient = v1::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>,
>;

/// Why the coordinator refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("missing or wrong join token")]
    Unauthenticated,
    #[error("{field} differs: worker has {worker:?}, coordinator has {coordinator:?}")]
    Mismatch {
        field: &'static str,
        worker: String,
        coordinator: String,
    },
    #[error("generation {stale} is over; the job is at generation {current}")]
    StaleGeneration { stale: u64, current: u64 },
    #[error("the group is full: {world_size} workers have joined generation {generation}")]
    WorldFull { world_size: u32, generation: u64 },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("unknown worker {0:?}")]
    UnknownWorker(String),
    #[error("the job is shutting down")]
    ShuttingDown,
    /// Generation `generation` failed and its processes are being stopped; the next
    /// generation's rendezvous opens shortly.
    #[error("generation {generation} failed and the group is re-forming; join again shortly")]
    Recovering { generation: u64 },
    /// An operation that needs a training group (e.g. a checkpoint request) in another phase.
    #[error("no group is training: the job is in its {phase} phase")]
    NotTraining { phase: &'static str },
    /// Authenticated, but not allowed: a worker's session credential that does not match its
    /// (worker, rank, generation), or a worker's token on an operator's command.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

impl ClusterError {
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated => Code::Unauthenticated,
            Self::Mismatch { .. } => Code::FailedPrecondition,
            Self::StaleGeneration { .. } => Code::Aborted,
            Self::WorldFull { .. } => Code::ResourceExhausted,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::UnknownWorker(_) => Code::NotFound,
            Self::ShuttingDown | Self::Recovering { .. } => Code::Unavailable,
            Self::NotTraining { .. } => Code::FailedPrecondition,
            Self::PermissionDenied(_) => Code::PermissionDenied,
        }
    }
}

impl From<ClusterError> for Status {
    fn from(error: ClusterError) -> Self {
        Status::new(error.code(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes() {
        let cases = [
            (ClusterError::Unauthenticated, Code::Unauthenticated),
            (
                ClusterError::Mismatch {
                    field: "version",
                    worker: "a".into(),
                    coordinator: "b".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ClusterError::StaleGeneration {
                    stale: 1,
                    current: 2,
                },
                Code::Aborted,
            ),
            (
                ClusterError::WorldFull {
                    world_size: 2,
                    generation: 0,
                },
                Code::ResourceExhausted,
            ),
            (
                ClusterError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (
                ClusterError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
            // A worker's join loop retries Unavailable: it waits out a recovery.
            (
                ClusterError::Recovering { generation: 3 },
                Code::Unavailable,
            ),
            (
                ClusterError::NotTraining {
                    phase: "rendezvous",
                },
                Code::FailedPrecondition,
            ),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn messages_round_trip_through_protobuf() {
        use prost::Message;
        let join = v1::JoinResponse {
            rank: 3,
            world_size: 4,
            ring_peers: vec!["127.0.0.1:1".into(); 4],
            ring_secret: vec![7; 32],
            ..Default::default()
        };
        let back = v1::JoinResponse::decode(join.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, join);
    }
}
