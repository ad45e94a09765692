//! Matching queued jobs with waiting VMs.
//!
//! Two FIFO lines meet here: jobs waiting for a VM (in submission order) and
//! VMs waiting for a job (in the order they started their long poll). A job
//! goes to the **first** waiting VM whose labels include all of the job's
//! `runs-on` labels; a VM that starts waiting takes the **first** queued job
//! it can run. Whichever side arrives second finds its partner at once, so
//! a job never sits in the queue while a matching VM waits.
//!
//! This is plain data: no clocks, no I/O, no locking (the caller holds the
//! lock of the whole registry).

use std::collections::VecDeque;

use protocol::api::VmId;
use protocol::message::JobId;

/// Whether a VM with `vm_labels` can run a job asking for `runs_on`.
pub fn satisfies(vm_labels: &[String], runs_on: &[String]) -> bool {
    runs_on.iter().all(|label| vm_labels.contains(label))
}

#[derive(Debug)]
struct QueuedJob {
    id: JobId,
    runs_on: Vec<String>,
}

#[derive(Debug)]
struct WaitingVm {
    id: VmId,
    labels: Vec<String>,
}

/// The two FIFO lines of unmatched jobs and unmatched VMs.
#[derive(Debug, Default)]
pub struct Matchmaker {
    queue: VecDeque<QueuedJob>,
    waiting: VecDeque<WaitingVm>,
}

impl Matchmaker {
    /// An empty matchmaker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A job arrives: returns the first waiting VM that can run it (removed
    /// from the waiting line), or queues the job at the back.
    pub fn offer_job(&mut self, id: JobId, runs_on: Vec<String>) -> Option<VmId> {
        match self.take_vm_for(&runs_on) {
            Some(vm) => Some(vm),
            None => {
                self.queue.push_back(QueuedJob { id, runs_on });
                None
            }
        }
    }

    /// A job comes back (its VM never received it): like
    /// [`Self::offer_job`], but if no VM takes it, it goes to the front of
    /// the queue, keeping its turn.
    pub fn return_job(&mut self, id: JobId, runs_on: Vec<String>) -> Option<VmId> {
        match self.take_vm_for(&runs_on) {
            Some(vm) => Some(vm),
            None => {
                self.queue.push_front(QueuedJob { id, runs_on });
                None
            }
        }
    }

    /// A VM starts waiting: returns the first queued job it can run (removed
    /// from the queue), or puts the VM at the back of the waiting line.
    pub fn offer_vm(&mut self, id: VmId, labels: Vec<String>) -> Option<JobId> {
        let position = self
            .queue
            .iter()
            .position(|job| satisfies(&labels, &job.runs_on));
        match position.and_then(|i| self.queue.remove(i)) {
            Some(job) => Some(job.id),
            None => {
                self.waiting.push_back(WaitingVm { id, labels });
                None
            }
        }
    }

    /// Removes a queued job (cancelled, expired). Returns whether it was queued.
    pub fn withdraw_job(&mut self, id: &JobId) -> bool {
        let before = self.queue.len();
        self.queue.retain(|job| &job.id != id);
        self.queue.len() != before
    }

    /// Removes a waiting VM (poll ended, deregistered). Returns whether it
    /// was waiting.
    pub fn withdraw_vm(&mut self, id: &VmId) -> bool {
        let before = self.waiting.len();
        self.waiting.retain(|vm| &vm.id != id);
        self.waiting.len() != before
    }

    /// Number of queued jobs.
    pub fn queued_len(&self) -> usize {
        self.queue.len()
    }

    /// Number of waiting VMs.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Queued jobs, oldest first.
    pub fn queued_jobs(&self) -> impl Iterator<Item = &JobId> {
        self.queue.iter().map(|job| &job.id)
    }

    fn take_vm_for(&mut self, runs_on: &[String]) -> Option<VmId> {
        let position = self
            .waiting
            .iter()
            .position(|vm| satisfies(&vm.labels, runs_on))?;
        self.waiting.remove(position).map(|vm| vm.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn job(id: &str) -> JobId {
        JobId(id.into())
    }

    fn vm(id: &str) -> VmId {
        VmId(id.into())
    }

    #[test]
    fn vm_labels_must_include_every_runs_on_label() {
        let vm_labels = labels(&["linux", "x64", "large"]);
        assert!(satisfies(&vm_labels, &labels(&["linux"])));
        assert!(satisfies(&vm_labels, &labels(&["x64", "linux"])));
        assert!(!satisfies(&vm_labels, &labels(&["linux", "arm64"])));
        assert!(!satisfies(&labels(&[]), &labels(&["linux"])));
    }

    #[test]
    fn job_goes_to_first_waiting_vm_that_matches() {
        let mut mm = Matchmaker::new();
        assert_eq!(mm.offer_vm(vm("arm"), labels(&["linux", "arm64"])), None);
        assert_eq!(mm.offer_vm(vm("x1"), labels(&["linux", "x64"])), None);
        assert_eq!(mm.offer_vm(vm("x2"), labels(&["linux", "x64"])), None);
        assert_eq!(
            mm.offer_job(job("j1"), labels(&["x64"])),
            Some(vm("x1")),
            "FIFO among matching VMs, non-matching ones skipped"
        );
        assert_eq!(mm.offer_job(job("j2"), labels(&["x64"])), Some(vm("x2")));
        assert_eq!(mm.offer_job(job("j3"), labels(&["x64"])), None);
        assert_eq!(mm.waiting_len(), 1);
        assert_eq!(mm.queued_len(), 1);
    }

    #[test]
    fn vm_takes_first_queued_job_it_can_run() {
        let mut mm = Matchmaker::new();
        assert_eq!(mm.offer_job(job("gpu"), labels(&["gpu"])), None);
        assert_eq!(mm.offer_job(job("a"), labels(&["linux"])), None);
        assert_eq!(mm.offer_job(job("b"), labels(&["linux"])), None);
        assert_eq!(mm.offer_vm(vm("v"), labels(&["linux"])), Some(job("a")));
        assert_eq!(mm.offer_vm(vm("v"), labels(&["linux"])), Some(job("b")));
        assert_eq!(mm.offer_vm(vm("v"), labels(&["linux"])), None);
        assert_eq!(
            mm.queued_jobs().collect::<Vec<_>>(),
            [&job("gpu")],
            "a job no VM can run keeps waiting"
        );
    }

    #[test]
    fn returned_job_keeps_its_turn() {
        let mut mm = Matchmaker::new();
        mm.offer_job(job("later"), labels(&["linux"]));
        assert_eq!(mm.return_job(job("first"), labels(&["linux"])), None);
        assert_eq!(mm.offer_vm(vm("v"), labels(&["linux"])), Some(job("first")));
        mm.offer_vm(vm("w"), labels(&["linux"]));
        assert_eq!(mm.waiting_len(), 0, "w took 'later'");
        mm.offer_vm(vm("idle"), labels(&["linux"]));
        assert_eq!(
            mm.return_job(job("again"), labels(&["linux"])),
            Some(vm("idle"))
        );
    }

    #[test]
    fn withdrawn_entries_are_no_longer_matched() {
        let mut mm = Matchmaker::new();
        mm.offer_job(job("j"), labels(&["linux"]));
        assert!(mm.withdraw_job(&job("j")));
        assert!(!mm.withdraw_job(&job("j")));
        mm.offer_vm(vm("v"), labels(&["linux"]));
        assert!(mm.withdraw_vm(&vm("v")));
        assert!(!mm.withdraw_vm(&vm("v")));
        assert_eq!(mm.offer_job(job("k"), labels(&["linux"])), None);
    }
}
