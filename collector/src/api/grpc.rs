//! The `phiaudit.v1.Query` gRPC service over [`Api`].

use std::pin::Pin;

use phi_proto::v1::{
    AccessLogRequest, AccessLogResponse, AddPrincipalRequest, AddPrincipalResponse, AlertsRequest,
    AlertsResponse, DisablePrincipalRequest, ExportChunk, ExportRequest, HoldRequest, HoldResponse,
    HostsRequest, HostsResponse, Principal, PrincipalsRequest, PrincipalsResponse, PruneRequest,
    PruneResponse, ReplayItem, ReplayRequest, SessionsRequest, SessionsResponse, StoredRecord,
    TimelineRequest, VerifyProgress, VerifyRequest, WhoAmIRequest, WhoAmIResponse,
    query_server::Query,
};
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use super::{Api, Caller, Peer};

pub struct GrpcQuery {
    api: Api,
}

impl GrpcQuery {
    pub fn new(api: Api) -> Self {
        GrpcQuery { api }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.api
            .authenticate(authorization, req.extensions().get::<Peer>())
            .await
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Query for GrpcQuery {
    type TimelineStream = ReceiverStream<Result<StoredRecord, Status>>;
    type ReplayStream = Boxed<ReplayItem>;
    type VerifyStream = ReceiverStream<Result<VerifyProgress, Status>>;
    type ExportStream = ReceiverStream<Result<ExportChunk, Status>>;

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.whoami(&c).await?))
    }

    async fn hosts(&self, req: Request<HostsRequest>) -> Result<Response<HostsResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.hosts(&c).await?))
    }

    async fn timeline(
        &self,
        req: Request<TimelineRequest>,
    ) -> Result<Response<Self::TimelineStream>, Status> {
        let c = self.caller(&req).await?;
        let rx = self.api.timeline(&c, req.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn sessions(
        &self,
        req: Request<SessionsRequest>,
    ) -> Result<Response<SessionsResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.api.sessions(&c, req.into_inner()).await?,
        ))
    }

    async fn replay(
        &self,
        req: Request<ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let c = self.caller(&req).await?;
        let (session, rx) = self.api.replay(&c, req.into_inner()).await?;
        let head = tokio_stream::once(Ok(ReplayItem {
            session: Some(session),
            record: None,
        }));
        let rest = ReceiverStream::new(rx).map(|r| {
            r.map(|record| ReplayItem {
                session: None,
                record: Some(record),
            })
        });
        Ok(Response::new(Box::pin(head.chain(rest))))
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let c = self.caller(&req).await?;
        let rx = self.api.verify(&c, req.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn export(
        &self,
        req: Request<ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let c = self.caller(&req).await?;
        let rx = self.api.export(&c, req.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn access_log(
        &self,
        req: Request<AccessLogRequest>,
    ) -> Result<Response<AccessLogResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.api.access_log(&c, req.into_inner()).await?,
        ))
    }

    async fn alerts(
        &self,
        req: Request<AlertsRequest>,
    ) -> Result<Response<AlertsResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.alerts(&c, req.into_inner()).await?))
    }

    async fn hold(&self, req: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.hold(&c, req.into_inner()).await?))
    }

    async fn prune(&self, req: Request<PruneRequest>) -> Result<Response<PruneResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.prune(&c, req.into_inner()).await?))
    }

    async fn principals(
        &self,
        req: Request<PrincipalsRequest>,
    ) -> Result<Response<PrincipalsResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(self.api.principals(&c).await?))
    }

    async fn add_principal(
        &self,
        req: Request<AddPrincipalRequest>,
    ) -> Result<Response<AddPrincipalResponse>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.api.add_principal(&c, req.into_inner()).await?,
        ))
    }

    async fn disable_principal(
        &self,
        req: Request<DisablePrincipalRequest>,
    ) -> Result<Response<Principal>, Status> {
        let c = self.caller(&req).await?;
        Ok(Response::new(
            self.api.disable_principal(&c, req.into_inner()).await?,
        ))
    }
}
