//! The gRPC face of the job.

use std::sync::Arc;

use gantry_proto::ClusterError;
use gantry_proto::v1::coordinator_server::Coordinator;
use gantry_proto::v1::{
    ControlCommand, ControlRequest, ControlResponse, FinishRequest, FinishResponse,
    HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, ShareNcclIdRequest,
    ShareNcclIdResponse, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{Role, require};
use crate::job::{Job, StopPlan};

#[derive(Debug, Clone)]
pub struct Service {
    pub job: Arc<Job>,
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        require(&request, Role::Worker)?;
        let assignment = self.job.join(request.into_inner())?;
        match assignment.await {
            Ok(result) => result.map(Response::new),
            // The generation ended before the group formed.
            Err(_) => Err(Status::aborted("the rendezvous was cancelled; join again")),
        }
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        require(&request, Role::Worker)?;
        Ok(Response::new(self.job.heartbeat(request.get_ref())?))
    }

    async fn finish(
        &self,
        request: Request<FinishRequest>,
    ) -> Result<Response<FinishResponse>, Status> {
        require(&request, Role::Worker)?;
        self.job.finish(request.get_ref())?;
        Ok(Response::new(FinishResponse {}))
    }

    async fn share_nccl_id(
        &self,
        request: Request<ShareNcclIdRequest>,
    ) -> Result<Response<ShareNcclIdResponse>, Status> {
        require(&request, Role::Worker)?;
        let shared = self.job.share_nccl_id(request.get_ref())?;
        match shared.await {
            Ok(nccl_id) => Ok(Response::new(ShareNcclIdResponse { nccl_id })),
            Err(_) => Err(Status::aborted(
                "the generation ended before rank 0 shared its NCCL id",
            )),
        }
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        require(&request, Role::Operator)?;
        Ok(Response::new(self.job.status()))
    }

    async fn control(
        &self,
        request: Request<ControlRequest>,
    ) -> Result<Response<ControlResponse>, Status> {
        require(&request, Role::Operator)?;
        let at_step = match ControlCommand::try_from(request.get_ref().command) {
            Ok(ControlCommand::Pause) => self.job.set_paused(true),
            Ok(ControlCommand::Resume) => self.job.set_paused(false),
            Ok(ControlCommand::Checkpoint) => self.job.request_checkpoint()?,
            Ok(ControlCommand::Stop) => match self.job.request_stop() {
                StopPlan::AtStep(at) => at,
                // No group was training: the job ends without a step to checkpoint.
                StopPlan::Now => 0,
            },
            _ => {
                return Err(ClusterError::InvalidArgument(
                    "control takes PAUSE, RESUME, CHECKPOINT or STOP".into(),
                )
                .into());
            }
        };
        Ok(Response::new(ControlResponse { at_step }))
    }
}
