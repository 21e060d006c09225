//! Per-tenant metrics reach an OTLP collector from the real binaries: a mesh
//! whose services export to a real OTLP/gRPC MetricsService inside this test,
//! a real `bulkhead-worker` that completes an acme task, and a globex task
//! cancelled by an operator. When the dispatcher shuts down it flushes
//! `bulkhead.tasks`, which must count each task once under its tenant and
//! final status.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use bulkhead_proto::dispatcher::v1 as pb;
use bulkhead_proto::dispatcher::v1::dispatcher_service_client::DispatcherServiceClient;
use bulkhead_proto::identity::v1 as idpb;
use bulkhead_proto::identity::v1::identity_service_client::IdentityServiceClient;
use bulkhead_testkit::mesh::TestMesh;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as Number;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

/// One exported data point of a sum: (service, metric, attributes, value).
type Point = (String, String, HashMap<String, String>, i64);

struct Collector(mpsc::UnboundedSender<Point>);

fn strings(attrs: &[KeyValue]) -> HashMap<String, String> {
    attrs
        .iter()
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
            _ => None,
        })
        .collect()
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        for rm in req.into_inner().resource_metrics {
            let resource = rm
                .resource
                .as_ref()
                .map(|r| strings(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let Some(Data::Sum(sum)) = &m.data else {
                        continue;
                    };
                    for p in &sum.data_points {
                        let value = match p.value {
                            Some(Number::AsInt(v)) => v,
                            Some(Number::AsDouble(v)) => v as i64,
                            None => 0,
                        };
                        let _ = self.0.send((
                            service.clone(),
                            m.name.clone(),
                            strings(&p.attributes),
                            value,
                        ));
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_counted_per_tenant_and_status() -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut mesh = TestMesh::start_with(|spec| {
        spec.otlp_endpoint = Some(format!("http://{collector}"));
    })
    .await?;

    // An approved agent and a worker of acme that runs it bare.
    let operator = mesh.identity("admin/operator")?;
    let mut dispatcher = DispatcherServiceClient::new(mesh.channel("dispatcher", &operator)?);
    dispatcher
        .submit_agent(pb::SubmitAgentRequest {
            name: "echo".into(),
            version: "1".into(),
            image: "local/echo".into(),
            command: vec!["/bin/sh".into(), "-c".into(), "cat; echo done".into()],
            ..Default::default()
        })
        .await
        .context("submit")?;
    let reviewer = mesh.identity("admin/reviewer")?;
    DispatcherServiceClient::new(mesh.channel("dispatcher", &reviewer)?)
        .approve_agent(pb::ApproveAgentRequest {
            name: "echo".into(),
            version: "1".into(),
            comment: "reviewed".into(),
        })
        .await
        .context("approve")?;
    let token = IdentityServiceClient::new(mesh.channel("identity", &operator)?)
        .create_join_token(idpb::CreateJoinTokenRequest {
            tenant: "acme".into(),
            max_uses: 1,
            ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            description: "metrics test".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .token;
    let scratch = tempfile::tempdir()?;
    let worker_log = scratch.path().join("worker.log");
    let log = std::fs::File::create(&worker_log)?;
    let mut worker = tokio::process::Command::new(bulkhead_cluster::find_binary("worker", None)?)
        .arg("--dispatcher")
        .arg(mesh.addr("dispatcher")?)
        .arg("--identity")
        .arg(mesh.addr("identity")?)
        .arg("--ca")
        .arg(&mesh.mesh.endpoints.ca)
        .arg("--name")
        .arg("metrics")
        .arg("--state-dir")
        .arg(scratch.path().join("state"))
        .arg("--work-dir")
        .arg(scratch.path())
        .arg("--shutdown-grace-secs")
        .arg("1")
        .env("BULKHEAD_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("start bulkhead-worker")?;

    // acme's task completes; globex's (no globex worker) is cancelled.
    let enqueue = |tenant: &str| pb::EnqueueRequest {
        tenant: tenant.into(),
        agent: "echo".into(),
        payload: b"hello".to_vec().into(),
        ..Default::default()
    };
    let done = dispatcher
        .enqueue(enqueue("acme"))
        .await?
        .into_inner()
        .task_id;
    let cancelled = dispatcher
        .enqueue(enqueue("globex"))
        .await?
        .into_inner()
        .task_id;
    dispatcher
        .cancel_task(pb::CancelTaskRequest {
            tenant: "globex".into(),
            task_id: cancelled.clone(),
            reason: "not needed".into(),
        })
        .await
        .context("cancel")?;
    let deadline = Instant::now() + WAIT;
    loop {
        let t = dispatcher
            .get_task(pb::GetTaskRequest {
                tenant: "acme".into(),
                task_id: done.clone(),
            })
            .await?
            .into_inner()
            .task
            .context("no task")?;
        if t.status() == pb::TaskStatus::Succeeded {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "acme's task is {:?}\n--- worker ---\n{}\n{}",
                t.status(),
                std::fs::read_to_string(&worker_log).unwrap_or_default(),
                mesh.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = worker.kill().await;

    // A graceful stop flushes what the dispatcher counted.
    mesh.mesh
        .process_mut("dispatcher")
        .context("no dispatcher")?
        .stop()
        .await;
    let want = [("acme", "succeeded"), ("globex", "cancelled")];
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !want.iter().all(|(tenant, status)| {
        seen.iter().any(|(svc, name, attrs, value): &Point| {
            svc == "bulkhead-dispatcher"
                && name == "bulkhead.tasks"
                && attrs.get("bulkhead.tenant").map(String::as_str) == Some(*tenant)
                && attrs.get("bulkhead.status").map(String::as_str) == Some(*status)
                && *value == 1
        })
    }) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(p)) => seen.push(p),
            _ => bail!(
                "bulkhead.tasks never showed {want:?}; got {seen:?}\n{}",
                mesh.logs()
            ),
        }
    }
    // Nothing but final statuses, and only the two tasks.
    let tasks: Vec<&Point> = seen
        .iter()
        .filter(|(_, name, _, _)| name == "bulkhead.tasks")
        .collect();
    ensure!(
        tasks
            .iter()
            .all(|(_, _, a, _)| matches!(a["bulkhead.status"].as_str(), "succeeded" | "cancelled")),
        "{tasks:?}"
    );
    Ok(())
}
