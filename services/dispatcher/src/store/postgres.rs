//! Skeleton: being implemented.

use super::*;
use crate::model::*;

#[derive(Debug)]
pub struct PgStore;

impl PgStore {
    pub async fn open(_url: &str) -> Result<Self, StoreError> {
        todo!()
    }
}

#[async_trait::async_trait]
impl DispatchStore for PgStore {
    async fn submit_agent(&self, _agent: &AgentRow) -> Result<bool, StoreError> {
        todo!()
    }
    async fn get_agent(&self, _name: &str, _version: &str) -> Result<Option<AgentRow>, StoreError> {
        todo!()
    }
    async fn latest_approved_agent(&self, _name: &str) -> Result<Option<AgentRow>, StoreError> {
        todo!()
    }
    async fn decide_agent(
        &self,
        _name: &str,
        _version: &str,
        _status: AgentStatus,
        _decided_by: &str,
        _decided_at_ms: i64,
        _reason: &str,
    ) -> Result<Decision, StoreError> {
        todo!()
    }
    async fn list_agents(
        &self,
        _name: &str,
        _status: Option<AgentStatus>,
        _offset: u64,
        _limit: u32,
    ) -> Result<Vec<AgentRow>, StoreError> {
        todo!()
    }
    async fn upsert_worker(&self, _worker: &WorkerRow) -> Result<(), StoreError> {
        todo!()
    }
    async fn get_worker(&self, _worker_id: &str) -> Result<Option<WorkerRow>, StoreError> {
        todo!()
    }
    async fn set_worker_state(
        &self,
        _worker_id: &str,
        _state: WorkerState,
    ) -> Result<bool, StoreError> {
        todo!()
    }
    async fn list_workers(
        &self,
        _filter: &WorkerFilter,
        _after_worker_id: &str,
        _limit: u32,
    ) -> Result<Vec<WorkerRow>, StoreError> {
        todo!()
    }
    async fn workers_of_scope(&self, _scope: &Scope) -> Result<Vec<WorkerRow>, StoreError> {
        todo!()
    }
    async fn remove_workers(&self, _worker_ids: &[String]) -> Result<(), StoreError> {
        todo!()
    }
    async fn insert_task(
        &self,
        _task: &TaskRow,
        _dedup_since_ms: i64,
    ) -> Result<Inserted, StoreError> {
        todo!()
    }
    async fn find_idempotent(
        &self,
        _scope: &Scope,
        _idempotency_key: &str,
        _since_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError> {
        todo!()
    }
    async fn get_task(&self, _task_id: &str) -> Result<Option<TaskRow>, StoreError> {
        todo!()
    }
    async fn list_tasks(
        &self,
        _filter: &TaskFilter,
        _before_seq: Option<i64>,
        _limit: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        todo!()
    }
    async fn claim(&self, _batch: &ClaimBatch<'_>) -> Result<Vec<TaskRow>, StoreError> {
        todo!()
    }
    async fn claim_task(
        &self,
        _scope: &Scope,
        _task_id: &str,
        _batch: &ClaimBatch<'_>,
    ) -> Result<ClaimOne, StoreError> {
        todo!()
    }
    async fn start_run(
        &self,
        _task_id: &str,
        _worker_id: &str,
        _lease_epoch: u64,
        _run_id: &str,
        _now_ms: i64,
        _lease_ms: i64,
    ) -> Result<Option<TaskRow>, StoreError> {
        todo!()
    }
    async fn release_attempt(
        &self,
        _task_id: &str,
        _lease_epoch: u64,
        _reason: &str,
        _now_ms: i64,
    ) -> Result<Option<Released>, StoreError> {
        todo!()
    }
    async fn renew_leases(
        &self,
        _worker_id: &str,
        _leases: &[(String, u64)],
        _now_ms: i64,
        _lease_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        todo!()
    }
    async fn finish(&self, _report: &Finish<'_>) -> Result<Finished, StoreError> {
        todo!()
    }
    async fn expire(&self, _now_ms: i64, _limit: u32) -> Result<Vec<Released>, StoreError> {
        todo!()
    }
    async fn cancel_task(
        &self,
        _task_id: &str,
        _reason: &str,
        _now_ms: i64,
    ) -> Result<Cancelled, StoreError> {
        todo!()
    }
    async fn release_workers_tasks(
        &self,
        _worker_ids: &[String],
        _reason: &str,
        _now_ms: i64,
    ) -> Result<Vec<Released>, StoreError> {
        todo!()
    }
    async fn queued_scopes(&self) -> Result<Vec<(Scope, u64)>, StoreError> {
        todo!()
    }
}
