//! The `cogmesh.v1.Workload` gRPC service. Each `InferRequest` message costs `work_ms` of service
//! time (a sleep) and fails with `fail_code`/`fail_message` when `fail_code` is non-zero:
//!
//! - `Infer`: "echo: PROMPT", seq 0. It goes through the simulated service ([`super::sim`]):
//!   on a limited instance it waits for a slot (RESOURCE_EXHAUSTED when the queue is full) and
//!   `work_ms` 0 means a drawn service time; injected delays and stalls apply to it.
//! - `Generate`: `count` replies "part i" with seq i; a failing request ends the stream with its
//!   status after the parts.
//! - `Upload`: one reply, the prompts joined by ",", seq = number of messages; a failing message
//!   fails the call.
//! - `Converse`: each message answered in turn with "echo: PROMPT", seq 0, 1, 2...; a failing
//!   message ends the stream with its status.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cogmesh_proto::v1::workload_server::Workload;
use cogmesh_proto::v1::{InferReply, InferRequest};
use futures_util::stream::{self, Stream, StreamExt};
use tonic::{Code, Request, Response, Status, Streaming};

use super::sim::{Refusal, Simulator};

/// A stream of replies, as the generated trait wants it.
pub(super) type ReplyStream = Pin<Box<dyn Stream<Item = Result<InferReply, Status>> + Send>>;

/// The workload's gRPC service; `name` goes into every reply's `served_by`.
#[derive(Debug, Clone)]
pub(crate) struct WorkloadService {
    name: Arc<str>,
    sim: Arc<Simulator>,
}

impl WorkloadService {
    /// A service with an unlimited simulator.
    #[cfg(test)]
    fn new(name: &str) -> Self {
        let sim = Simulator::new(name, super::sim::SimConfig::default());
        Self::with_simulator(name, Arc::new(sim))
    }

    pub(super) fn with_simulator(name: &str, sim: Arc<Simulator>) -> Self {
        Self {
            name: name.into(),
            sim,
        }
    }

    fn reply(&self, text: String, seq: u64) -> InferReply {
        InferReply {
            text,
            served_by: self.name.to_string(),
            seq,
        }
    }
}

/// The status a request asks to fail with, if any.
fn requested_failure(req: &InferRequest) -> Option<Status> {
    (req.fail_code != 0).then(|| Status::new(Code::from_i32(req.fail_code), &req.fail_message))
}

/// Spends the request's service time.
async fn work(req: &InferRequest) {
    if req.work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(req.work_ms.into())).await;
    }
}

#[tonic::async_trait]
impl Workload for WorkloadService {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferReply>, Status> {
        let req = request.into_inner();
        let service_time = if req.work_ms == 0 && self.sim.is_limited() {
            self.sim.draw_service_time()
        } else {
            Duration::from_millis(req.work_ms.into())
        };
        self.sim
            .work(service_time)
            .await
            .map_err(|refusal| match refusal {
                Refusal::QueueFull => Status::resource_exhausted(refusal.to_string()),
                Refusal::ShuttingDown => Status::unavailable(refusal.to_string()),
            })?;
        if let Some(status) = requested_failure(&req) {
            return Err(status);
        }
        Ok(Response::new(self.reply(format!("echo: {}", req.prompt), 0)))
    }

    type GenerateStream = ReplyStream;

    async fn generate(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let req = request.into_inner();
        work(&req).await;
        let service = self.clone();
        let parts =
            stream::iter(0..u64::from(req.count)).map(move |i| Ok(service.reply(format!("part {i}"), i)));
        let failure = stream::iter(requested_failure(&req).map(Err));
        Ok(Response::new(Box::pin(parts.chain(failure))))
    }

    async fn upload(
        &self,
        request: Request<Streaming<InferRequest>>,
    ) -> Result<Response<InferReply>, Status> {
        let mut inbound = request.into_inner();
        let mut prompts = Vec::new();
        while let Some(req) = inbound.next().await {
            let req = req?;
            work(&req).await;
            if let Some(status) = requested_failure(&req) {
                return Err(status);
            }
            prompts.push(req.prompt);
        }
        let seq = prompts.len() as u64;
        Ok(Response::new(self.reply(prompts.join(","), seq)))
    }

    type ConverseStream = ReplyStream;

    async fn converse(
        &self,
        request: Request<Streaming<InferRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        let service = self.clone();
        let replies = stream::unfold(Some((request.into_inner(), 0_u64)), move |state| {
            let service = service.clone();
            async move {
                let (mut inbound, seq) = state?;
                let req = match inbound.next().await? {
                    Ok(req) => req,
                    Err(status) => return Some((Err(status), None)),
                };
                work(&req).await;
                if let Some(status) = requested_failure(&req) {
                    return Some((Err(status), None));
                }
                let reply = service.reply(format!("echo: {}", req.prompt), seq);
                Some((Ok(reply), Some((inbound, seq + 1))))
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str, fail_code: i32) -> InferRequest {
        InferRequest {
            prompt: prompt.into(),
            fail_code,
            fail_message: "no such model".into(),
            ..Default::default()
        }
    }

    #[test]
    fn fail_code_zero_is_success() {
        assert!(requested_failure(&request("hi", 0)).is_none());
        let status = requested_failure(&request("hi", 5)).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such model");
        // Out-of-range codes still fail, as UNKNOWN.
        assert_eq!(
            requested_failure(&request("hi", 99)).unwrap().code(),
            Code::Unknown
        );
    }

    #[tokio::test]
    async fn infer_echoes_the_prompt() {
        let service = WorkloadService::new("w1");
        let reply = service
            .infer(Request::new(request("hi", 0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.text, "echo: hi");
        assert_eq!(reply.served_by, "w1");
        assert_eq!(reply.seq, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn infer_spends_work_ms() {
        let service = WorkloadService::new("w1");
        let start = tokio::time::Instant::now();
        let req = InferRequest {
            work_ms: 250,
            ..request("hi", 0)
        };
        service.infer(Request::new(req)).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test]
    async fn generate_sends_count_parts_then_the_failure() {
        let service = WorkloadService::new("w1");
        let req = InferRequest {
            count: 3,
            ..request("hi", 0)
        };
        let replies: Vec<_> = service
            .generate(Request::new(req))
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        let texts: Vec<_> = replies
            .iter()
            .map(|r| r.as_ref().unwrap().text.as_str())
            .collect();
        assert_eq!(texts, ["part 0", "part 1", "part 2"]);
        assert_eq!(replies[2].as_ref().unwrap().seq, 2);

        let req = InferRequest {
            count: 1,
            ..request("hi", 9)
        };
        let replies: Vec<_> = service
            .generate(Request::new(req))
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].as_ref().unwrap_err().code(), Code::FailedPrecondition);
    }
}
