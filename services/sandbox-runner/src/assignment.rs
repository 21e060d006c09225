//! What a run was assigned, as the dispatcher knows it (GetRunAssignment),
//! and how a StartSandbox request is settled against it: the runner runs the
//! assignment's image, command, cascade, agent, tool, keys and payload,
//! whatever the worker sent. A worker may leave those fields empty; a value
//! it sends must equal the assignment's, or the start is refused (a worker
//! must not choose what runs with its tenant's credentials).

use std::time::{Duration, SystemTime};

use bulkhead_mesh::Error;
use bulkhead_proto::dispatcher::v1 as disp_pb;
use bulkhead_proto::sealed::v1 as sealed_pb;

use crate::model::{self, StartRequest};

/// A running run's assignment, checked against the run it was asked for.
#[derive(Clone)]
pub struct Assigned {
    pub task_id: String,
    /// The worker holding the run.
    pub worker_id: String,
    /// The approved agent version's image.
    pub image: String,
    /// The approved agent version's argv.
    pub command: Vec<String>,
    /// The task's cascade, as enqueued.
    pub cascade: Option<sealed_pb::Cascade>,
    /// The agent's name.
    pub agent: String,
    /// The agent's tool (its name when it named none).
    pub tool: String,
    /// The keys the agent requested: the only secrets delivered (empty:
    /// none; the cascade's settings still are).
    pub secret_keys: Vec<String>,
    pub payload: bytes::Bytes,
    /// When the attempt must have reported.
    pub deadline: Option<SystemTime>,
}

impl std::fmt::Debug for Assigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Assigned")
            .field("task_id", &self.task_id)
            .field("worker_id", &self.worker_id)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("agent", &self.agent)
            .field("tool", &self.tool)
            .finish_non_exhaustive()
    }
}

fn inconsistent(what: &str) -> Error {
    Error::unavailable(
        "dispatcher",
        std::io::Error::other(format!(
            "the dispatcher's assignment is inconsistent: {what}"
        )),
    )
}

impl Assigned {
    /// The dispatcher's answer for the run `run_id` of `tenant` (or `pool`),
    /// checked: it must be that run's, and within the bounds of a request.
    pub fn from_response(
        resp: disp_pb::GetRunAssignmentResponse,
        tenant: &str,
        pool: &str,
        run_id: &str,
    ) -> Result<Self, Error> {
        let a = resp
            .assignment
            .ok_or_else(|| inconsistent("no assignment"))?;
        let task = a.task.ok_or_else(|| inconsistent("no task"))?;
        let agent = a.agent.ok_or_else(|| inconsistent("no agent"))?;
        if task.run_id != run_id || task.tenant != tenant || task.pool != pool {
            return Err(inconsistent("another run's task"));
        }
        if task.agent != agent.name {
            return Err(inconsistent("another agent"));
        }
        if resp.worker_id.is_empty() {
            return Err(inconsistent("no worker"));
        }
        if tenant.is_empty() && task.cascade.is_some() {
            return Err(inconsistent("a pool task with a cascade"));
        }
        // The same bounds as a request's, so that nothing the dispatcher
        // holds reaches a backend unchecked.
        let bounded = agent.image.len() <= model::MAX_IMAGE
            && !agent.image.is_empty()
            && !agent
                .image
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ')
            && agent.command.len() <= model::MAX_ARGS
            && agent.command.iter().map(String::len).sum::<usize>() <= model::MAX_ARGV_BYTES
            && !agent.command.iter().any(|a| a.contains('\0'))
            && agent.requested_secret_keys.len() <= model::MAX_KEYS
            && agent
                .requested_secret_keys
                .iter()
                .all(|k| model::valid_key(k))
            && task.payload.len() <= model::MAX_PAYLOAD
            && model::valid_id(&task.task_id);
        if !bounded {
            return Err(inconsistent("out of bounds"));
        }
        let deadline = a.deadline.map(|t| {
            let secs = u64::try_from(t.seconds).unwrap_or(0);
            let nanos = u32::try_from(t.nanos).unwrap_or(0);
            SystemTime::UNIX_EPOCH + Duration::new(secs, nanos)
        });
        let tool = if agent.tool.is_empty() {
            agent.name.clone()
        } else {
            agent.tool
        };
        Ok(Self {
            task_id: task.task_id,
            worker_id: resp.worker_id,
            image: agent.image,
            command: agent.command,
            cascade: task.cascade,
            agent: agent.name,
            tool,
            secret_keys: agent.requested_secret_keys,
            payload: task.payload,
            deadline,
        })
    }

    /// The program the process backend runs: the command's argv[0], by
    /// absolute path, or a bare name found in `search_path` (a `PATH`).
    pub fn program(&self, search_path: &str) -> Result<String, Error> {
        let Some(first) = self.command.first() else {
            return Err(Error::FailedPrecondition(
                "the agent has no command for the process backend".into(),
            ));
        };
        if first.starts_with('/') {
            return Ok(first.clone());
        }
        if first.is_empty() || first.contains('/') {
            return Err(Error::FailedPrecondition(format!(
                "the agent's program {first} is neither an absolute path nor a bare name"
            )));
        }
        search_path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| std::path::Path::new(d).join(first))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!(
                    "the agent's program {first} is not present on this host"
                ))
            })
    }

    /// Settles `req` against the assignment: every field the runner takes
    /// from it is replaced by the assignment's. A field the worker set to
    /// something else is named in the error (the start must be refused).
    /// `program` is the process backend's program, which the worker may
    /// send as the image (it did before the runner asked the dispatcher).
    pub fn settle(
        &self,
        req: &mut StartRequest,
        program: Option<&str>,
    ) -> Result<(), &'static str> {
        fn keys(k: &[String]) -> Vec<&str> {
            let mut v: Vec<&str> = k.iter().map(String::as_str).collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        if !req.task_id.is_empty() && req.task_id != self.task_id {
            return Err("task_id");
        }
        if !req.image.is_empty() && req.image != self.image && Some(req.image.as_str()) != program {
            return Err("image");
        }
        if !req.command.is_empty() && req.command != self.command {
            return Err("command");
        }
        if req.cascade.is_some() && req.cascade != self.cascade {
            return Err("cascade");
        }
        if !req.agent.is_empty() && req.agent != self.agent {
            return Err("agent");
        }
        if !req.tool.is_empty() && req.tool != self.tool {
            return Err("tool");
        }
        if !req.secret_keys.is_empty() && keys(&req.secret_keys) != keys(&self.secret_keys) {
            return Err("secret_keys");
        }
        if !req.payload.is_empty() && req.payload != self.payload {
            return Err("payload");
        }
        req.task_id.clone_from(&self.task_id);
        req.image = program.map_or_else(|| self.image.clone(), str::to_owned);
        req.command.clone_from(&self.command);
        req.cascade.clone_from(&self.cascade);
        req.agent.clone_from(&self.agent);
        req.tool.clone_from(&self.tool);
        req.secret_keys.clone_from(&self.secret_keys);
        req.payload = self.payload.clone();
        Ok(())
    }

    /// What is left of the attempt's time; `None` without a deadline.
    pub fn time_left(&self, now: SystemTime) -> Option<Duration> {
        self.deadline
            .map(|d| d.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_proto::sandbox::v1 as pb;

    fn response() -> disp_pb::GetRunAssignmentResponse {
        disp_pb::GetRunAssignmentResponse {
            assignment: Some(disp_pb::ClaimAssignment {
                task: Some(disp_pb::Task {
                    tenant: "acme".into(),
                    task_id: "t1".into(),
                    agent: "bot".into(),
                    run_id: "r1".into(),
                    payload: b"payload".to_vec().into(),
                    cascade: Some(sealed_pb::Cascade::default()),
                    ..Default::default()
                }),
                agent: Some(disp_pb::Agent {
                    name: "bot".into(),
                    version: "1".into(),
                    image: "agent:1".into(),
                    command: vec!["/bin/sh".into(), "-c".into(), "cat".into()],
                    requested_secret_keys: vec!["A".into(), "B".into()],
                    ..Default::default()
                }),
                attempt: 1,
                lease_epoch: 1,
                deadline: None,
            }),
            worker_id: "w1".into(),
        }
    }

    fn assigned() -> Assigned {
        Assigned::from_response(response(), "acme", "", "r1").expect("valid")
    }

    fn empty_request() -> StartRequest {
        StartRequest::try_from(pb::StartSandboxRequest {
            tenant: "acme".into(),
            run_jwt_svid: "a.b.c".into(),
            ..Default::default()
        })
        .expect("valid")
    }

    #[test]
    fn empty_fields_take_the_assignment() {
        let a = assigned();
        assert_eq!(a.tool, "bot", "the agent's name when it names no tool");
        let mut r = empty_request();
        a.settle(&mut r, None).expect("settles");
        assert_eq!(r.image, "agent:1");
        assert_eq!(r.command, a.command);
        assert_eq!(r.task_id, "t1");
        assert_eq!(r.agent, "bot");
        assert_eq!(r.secret_keys, vec!["A".to_owned(), "B".to_owned()]);
        assert_eq!(&r.payload[..], b"payload");
        assert!(r.cascade.is_some());
        let mut r = empty_request();
        a.settle(&mut r, Some("/bin/sh")).expect("settles");
        assert_eq!(r.image, "/bin/sh", "the process backend's program");
    }

    #[test]
    fn equal_fields_pass_and_different_ones_are_named() {
        let a = assigned();
        let mut same = empty_request();
        same.image = "agent:1".into();
        same.command = a.command.clone();
        same.secret_keys = vec!["B".into(), "A".into()];
        same.payload = a.payload.clone();
        same.agent = "bot".into();
        same.tool = "bot".into();
        same.task_id = "t1".into();
        same.cascade = a.cascade.clone();
        a.settle(&mut same, None).expect("equal values pass");
        let mut program = empty_request();
        program.image = "/bin/sh".into();
        a.settle(&mut program, Some("/bin/sh"))
            .expect("the program as the image");

        let differs = |f: &dyn Fn(&mut StartRequest)| {
            let mut r = empty_request();
            f(&mut r);
            a.settle(&mut r, None).expect_err("refused")
        };
        assert_eq!(
            differs(&|r| {
                r.command = vec!["sh".into(), "-c".into(), "printf %s \"$KEY\" | rev".into()];
            }),
            "command"
        );
        assert_eq!(differs(&|r| r.image = "other:1".into()), "image");
        assert_eq!(differs(&|r| r.agent = "other".into()), "agent");
        assert_eq!(differs(&|r| r.tool = "other".into()), "tool");
        assert_eq!(differs(&|r| r.task_id = "t2".into()), "task_id");
        assert_eq!(
            differs(&|r| r.secret_keys = vec!["A".into()]),
            "secret_keys"
        );
        assert_eq!(
            differs(&|r| r.payload = b"other".to_vec().into()),
            "payload"
        );
        assert_eq!(
            differs(&|r| {
                r.cascade = Some(sealed_pb::Cascade {
                    system: Some(sealed_pb::CascadeLevel::default()),
                    ..Default::default()
                });
            }),
            "cascade"
        );
    }

    #[test]
    fn an_answer_for_another_run_is_not_used() {
        assert!(Assigned::from_response(response(), "acme", "", "r2").is_err());
        assert!(Assigned::from_response(response(), "globex", "", "r1").is_err());
        assert!(Assigned::from_response(response(), "", "shared", "r1").is_err());
        let mut bad = response();
        if let Some(a) = bad.assignment.as_mut().and_then(|a| a.agent.as_mut()) {
            a.image = "two words".into();
        }
        assert!(Assigned::from_response(bad, "acme", "", "r1").is_err());
    }

    #[test]
    fn the_program_is_argv0_by_path_or_name() {
        let mut a = assigned();
        assert_eq!(a.program("/usr/bin:/bin").expect("absolute"), "/bin/sh");
        a.command = vec!["sh".into()];
        let found = a.program("/nonexistent:/bin").expect("found");
        assert_eq!(found, "/bin/sh");
        a.command = vec!["./sh".into()];
        assert!(a.program("/bin").is_err());
        a.command = Vec::new();
        assert!(a.program("/bin").is_err());
    }
}
