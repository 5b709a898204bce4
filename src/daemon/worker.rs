//! Background jobs: named, stoppable one by one, never silent.
//!
//! A job's body runs under a supervisor. When the body returns an error or
//! panics, the supervisor logs it, counts it (`ferry_job_errors_total`),
//! shows it in `ferry status` and `ferry_job_failing`, waits (1 s doubling to
//! 60 s) and runs the body again. A body returns `Ok` only when it was told
//! to stop. Bodies wait on events (and on timers they were given as inputs),
//! never on polling loops: an idle job costs nothing.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Backoff between runs of a failing job.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a stopping job may take before it is aborted.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What status shows of a job.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobView {
    pub name: String,
    /// "running", "retrying" (after an error, waiting to run again), "stopped".
    pub state: String,
    pub last_error: Option<String>,
    /// Unix seconds of the last error.
    pub last_error_at: Option<u64>,
    /// Errors (panics included) since the daemon started.
    pub errors: u64,
    pub panics: u64,
}

/// The metrics a job reports to (the `job` and `volume` labels).
#[derive(Clone)]
pub struct JobMetrics {
    pub errors: prometheus::IntCounterVec,
    pub failing: prometheus::IntGaugeVec,
}

/// What a job's body gets: its stop signal and its status.
#[derive(Clone)]
pub struct JobCtx {
    stop: watch::Receiver<bool>,
    /// The body's task now (so that a stop that times out can abort it).
    body: Arc<Mutex<Option<tokio::task::AbortHandle>>>,
    view: Arc<Mutex<JobView>>,
    labels: [String; 2],
    metrics: JobMetrics,
}

impl JobCtx {
    /// Resolves once the job is told to stop.
    pub async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// The body made progress: a past error is no longer the job's state.
    pub fn healthy(&self) {
        let mut v = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if v.last_error.is_some() || v.state != "running" {
            v.last_error = None;
            v.state = "running".into();
            self.metrics
                .failing
                .with_label_values(&[&self.labels[0], &self.labels[1]])
                .set(0);
        }
    }

    /// Records an error the body recovers from by itself (it goes on).
    pub fn error(&self, e: &str) {
        record_error(&self.view, &self.labels, &self.metrics, e, false);
    }
}

fn record_error(
    view: &Mutex<JobView>,
    labels: &[String; 2],
    metrics: &JobMetrics,
    e: &str,
    panic: bool,
) {
    let mut v = view.lock().unwrap_or_else(|p| p.into_inner());
    let repeat = v.last_error.as_deref() == Some(e);
    v.errors += 1;
    if panic {
        v.panics += 1;
    }
    v.last_error = Some(e.to_string());
    v.last_error_at = Some(crate::util::now_unix());
    drop(v);
    metrics
        .errors
        .with_label_values(&[&labels[0], &labels[1]])
        .inc();
    metrics
        .failing
        .with_label_values(&[&labels[0], &labels[1]])
        .set(1);
    // The same error again is counted, not logged again at error level.
    if repeat {
        tracing::debug!(job = %labels[0], volume = %labels[1], error = e, "job failed again");
    } else {
        tracing::error!(job = %labels[0], volume = %labels[1], error = e, "job failed; it runs again after a backoff");
    }
}

/// A running job, owned by whoever may stop it.
pub struct Job {
    view: Arc<Mutex<JobView>>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    body: Arc<Mutex<Option<tokio::task::AbortHandle>>>,
}

impl Job {
    /// Starts `body` under a supervisor. `volume` is empty for site-wide jobs.
    pub fn spawn<F, Fut>(name: &str, volume: &str, metrics: JobMetrics, body: F) -> Job
    where
        F: Fn(JobCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let view = Arc::new(Mutex::new(JobView {
            name: name.to_string(),
            state: "running".into(),
            ..Default::default()
        }));
        let (stop, stop_rx) = watch::channel(false);
        let labels = [name.to_string(), volume.to_string()];
        metrics.errors.with_label_values(&[&labels[0], &labels[1]]);
        metrics
            .failing
            .with_label_values(&[&labels[0], &labels[1]])
            .set(0);
        let body_handle = Arc::new(Mutex::new(None));
        let ctx = JobCtx {
            stop: stop_rx,
            body: body_handle.clone(),
            view: view.clone(),
            labels,
            metrics,
        };
        let task = tokio::spawn(supervise(ctx, body));
        Job {
            view,
            stop,
            task: Mutex::new(Some(task)),
            body: body_handle,
        }
    }

    pub fn view(&self) -> JobView {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tells the job to stop (its body sees it at its next wait).
    pub fn signal_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops the job and waits until its body has returned; a body that
    /// does not return within `STOP_WAIT` is named in the log and aborted.
    pub async fn stop(&self) {
        self.signal_stop();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut t) = task
            && tokio::time::timeout(STOP_WAIT, &mut t).await.is_err()
        {
            let v = self.view();
            tracing::error!(job = %v.name, "job did not stop in time; aborting it");
            if let Some(b) = self.body.lock().unwrap_or_else(|p| p.into_inner()).take() {
                b.abort();
            }
            t.abort();
            let _ = t.await;
        }
    }
}

async fn supervise<F, Fut>(mut ctx: JobCtx, body: F)
where
    F: Fn(JobCtx) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let mut backoff = BACKOFF_FIRST;
    loop {
        if ctx.is_stopped() {
            break;
        }
        let started = std::time::Instant::now();
        // A task of its own, so that a panic is caught here and not lost.
        let run = tokio::spawn(body(ctx.clone()));
        *ctx.body.lock().unwrap_or_else(|p| p.into_inner()) = Some(run.abort_handle());
        let (e, panic) = match run.await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => (e, false),
            Err(j) if j.is_panic() => {
                let p = j.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                (format!("panicked: {msg}"), true)
            }
            Err(_) => break,
        };
        record_error(&ctx.view, &ctx.labels, &ctx.metrics, &e, panic);
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_FIRST;
        }
        ctx.view.lock().unwrap_or_else(|p| p.into_inner()).state = "retrying".into();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = ctx.stopped() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        ctx.view.lock().unwrap_or_else(|p| p.into_inner()).state = "running".into();
    }
    ctx.view.lock().unwrap_or_else(|p| p.into_inner()).state = "stopped".into();
}

/// The jobs of one owner (a volume, or the site), stopped together.
#[derive(Default)]
pub struct Jobs {
    list: Mutex<Vec<Arc<Job>>>,
}

impl Jobs {
    pub fn add(&self, job: Job) -> Arc<Job> {
        let job = Arc::new(job);
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job.clone());
        job
    }

    /// Starts the job `spawn` makes unless one of that name runs; the check
    /// and the start are one step (two requests cannot start two).
    pub fn spawn_once(&self, name: &str, spawn: impl FnOnce() -> Job) {
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|j| j.view().name == name) {
            list.push(Arc::new(spawn()));
        }
    }

    pub fn views(&self) -> Vec<JobView> {
        self.list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|j| j.view())
            .collect()
    }

    /// Tells every job to stop, without waiting.
    pub fn signal_all(&self) {
        for j in self.list.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            j.signal_stop();
        }
    }

    /// Stops every job and waits for each; the list is then empty.
    pub async fn stop_all(&self) {
        let jobs: Vec<Arc<Job>> =
            std::mem::take(&mut *self.list.lock().unwrap_or_else(|p| p.into_inner()));
        for j in &jobs {
            j.signal_stop();
        }
        for j in jobs {
            j.stop().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn metrics() -> JobMetrics {
        JobMetrics {
            errors: prometheus::IntCounterVec::new(
                prometheus::Opts::new("e", "e"),
                &["job", "volume"],
            )
            .unwrap(),
            failing: prometheus::IntGaugeVec::new(
                prometheus::Opts::new("f", "f"),
                &["job", "volume"],
            )
            .unwrap(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_or_panicking_job_is_shown_counted_and_run_again() {
        let m = metrics();
        let runs = Arc::new(AtomicU32::new(0));
        let r2 = runs.clone();
        let job = Job::spawn("apply", "vol", m.clone(), move |mut ctx| {
            let n = r2.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err("disk full".to_string()),
                    1 => panic!("bad state"),
                    _ => {
                        ctx.healthy();
                        ctx.stopped().await;
                        Ok(())
                    }
                }
            }
        });
        // The first run fails at once: shown and counted before the retry.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let v = job.view();
        assert_eq!(v.state, "retrying");
        assert_eq!(v.last_error.as_deref(), Some("disk full"));
        assert_eq!(m.failing.with_label_values(&["apply", "vol"]).get(), 1);
        // Then it panics; the supervisor restarts it after a longer backoff.
        tokio::time::sleep(BACKOFF_FIRST + Duration::from_millis(10)).await;
        let v = job.view();
        assert_eq!(v.panics, 1);
        assert!(v.last_error.unwrap().contains("bad state"));
        tokio::time::sleep(BACKOFF_FIRST * 2 + Duration::from_millis(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let v = job.view();
        assert_eq!(
            (v.state.as_str(), v.last_error, v.errors),
            ("running", None, 2)
        );
        assert_eq!(m.errors.with_label_values(&["apply", "vol"]).get(), 2);
        assert_eq!(m.failing.with_label_values(&["apply", "vol"]).get(), 0);
        job.stop().await;
        assert_eq!(job.view().state, "stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_ends_a_job_waiting_for_its_retry() {
        let job = Job::spawn("x", "", metrics(), |_| async { Err("no".to_string()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        job.stop().await;
        assert_eq!(job.view().state, "stopped");
    }
}
