//! Which module each shard runs, and changing it safely.
//!
//! A rollout names an **incumbent** and optionally a **candidate** with a
//! weight (0–100 %). With N shards, the candidate runs on the first
//! `round(weight × N / 100)` shards and the incumbent on the others; every
//! change moves whole shards, each by a hot swap (its open buckets carried
//! over through export → merge, at a batch boundary). The rollout is saved in
//! `<data_dir>/rollout.json` after every change and applied again at start.
//!
//! The **circuit breaker** (keep-last-good, like Envoy's FAIL_RELOAD): a
//! candidate that fails `breaker_failures` times within
//! `breaker_window_secs` is rolled back on all its shards, and marked rolled
//! back with the reason. Its unflushed data is not lost: a failing shard has
//! already rebuilt its state from its last snapshot plus a log of what it
//! did since, and the rollback carries that state to the incumbent.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};

use super::registry::{ModuleRecord, Registry};
use super::{AdminConfig, AdminError};
use crate::pipeline::PipelineControl;
use crate::runtime::cache::write_atomic;
use crate::shard::{Assignment, ShardEvent};
use crate::telemetry::Metrics;
use crate::telemetry::events::ModuleRolledBack;

/// The rollout as saved on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Rollout {
    incumbent: String,
    candidate: Option<String>,
    weight: u8,
}

/// The rollout as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The incumbent's id and label.
    pub incumbent: ModuleRef,
    /// The candidate's, if any.
    pub candidate: Option<ModuleRef>,
    /// Share of shards on the candidate, percent.
    pub weight: u8,
    /// Module id per shard, in shard order.
    pub shards: Vec<String>,
}

/// A module's id and label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRef {
    /// SHA-256, hex.
    pub id: String,
    /// `name@version`.
    pub label: String,
}

/// A module's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    /// Runs on the shards the candidate does not.
    Incumbent,
    /// Runs on its share of shards.
    Candidate,
    /// Runs in shadow beside the incumbent.
    Shadow,
    /// Rolled back (see `reason`).
    RolledBack,
    /// Registered, not running.
    Idle,
}

/// One module in the API's list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleView {
    /// Registry record (id, name, version, options, rollback reason).
    #[serde(flatten)]
    pub record: ModuleRecord,
    /// Its role.
    pub state: ModuleState,
    /// Shards running it now.
    pub shards: Vec<u32>,
    /// Linear memory over those shards, bytes.
    pub memory_bytes: u64,
    /// Largest linear memory of one of its instances, bytes.
    pub memory_peak_bytes: u64,
    /// Live series it holds.
    pub live_series: u64,
    /// Failures (traps, limits, bad output) by kind, since start.
    pub failures: BTreeMap<String, u64>,
}

struct State {
    registry: Registry,
    rollout: Rollout,
    /// Module id each shard runs.
    shards: Vec<String>,
    /// When the candidate failed, within the breaker window.
    candidate_failures: VecDeque<Instant>,
    /// Failures by module id and kind.
    failures: BTreeMap<String, BTreeMap<String, u64>>,
    /// The shadow module and the shards it runs on.
    shadow: Option<(String, Vec<u32>)>,
    /// Rows a module's shadow flushes disagreed on, by module id.
    diverged: BTreeMap<String, u64>,
}

/// Owns the registry and the rollout; every change goes through here, one
/// at a time.
pub struct Controller {
    state: Mutex<State>,
    control: PipelineControl,
    config: AdminConfig,
    path: PathBuf,
    fallback: String,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The incumbent to start the pipeline with: the saved rollout's, or
/// `default` (the configured strategy) when there is none.
///
/// # Errors
///
/// If the saved rollout names a module the registry does not have.
pub fn starting_incumbent(
    data_dir: &Path,
    registry: &Registry,
    default: &str,
) -> Result<Assignment, AdminError> {
    let id = match read_rollout(&rollout_path(data_dir))? {
        Some(r) => r.incumbent,
        None => registry
            .resolve(default)
            .map(|r| r.id.clone())
            .ok_or_else(|| AdminError::NotFound(default.to_string()))?,
    };
    registry.assignment(&id).ok_or(AdminError::NotFound(id))
}

fn rollout_path(data_dir: &Path) -> PathBuf {
    data_dir.join("rollout.json")
}

fn read_rollout(path: &Path) -> Result<Option<Rollout>, AdminError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AdminError::Storage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AdminError::Storage(format!("{}: {e}", path.display()))),
    }
}

impl Controller {
    /// Takes over a running pipeline whose shards all run `incumbent`:
    /// re-applies the saved rollout (a candidate's share) and starts the
    /// circuit breaker on `events`.
    ///
    /// # Errors
    ///
    /// If the saved rollout cannot be read or applied.
    pub async fn start(
        registry: Registry,
        incumbent: &str,
        control: PipelineControl,
        events: broadcast::Receiver<ShardEvent>,
        config: AdminConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Controller>, AdminError> {
        let path = rollout_path(data_dir);
        let saved = read_rollout(&path)?;
        let fallback = registry
            .resolve("hashmap@builtin")
            .map(|r| r.id.clone())
            .ok_or_else(|| AdminError::NotFound("hashmap@builtin".into()))?;
        let n = control.shards() as usize;
        let controller = Arc::new(Controller {
            state: Mutex::new(State {
                registry,
                rollout: Rollout {
                    incumbent: incumbent.to_string(),
                    candidate: None,
                    weight: 0,
                },
                shards: vec![incumbent.to_string(); n],
                candidate_failures: VecDeque::new(),
                failures: BTreeMap::new(),
                shadow: None,
                diverged: BTreeMap::new(),
            }),
            control,
            config,
            path,
            fallback,
            metrics,
        });
        {
            let state = controller.state.lock().await;
            controller.publish(&state);
        }
        if let Some(saved) = saved
            && let Some(candidate) = saved.candidate
        {
            controller.set_rollout(&candidate, saved.weight).await?;
        }
        tokio::spawn(breaker(Arc::downgrade(&controller), events));
        Ok(controller)
    }

    /// The admin configuration.
    pub fn config(&self) -> &AdminConfig {
        &self.config
    }

    /// Validates, compiles and stores a module (off the async workers).
    ///
    /// # Errors
    ///
    /// See [`Registry::add`].
    pub async fn upload(
        &self,
        bytes: Vec<u8>,
        name: String,
        version: String,
        options: Vec<(String, String)>,
    ) -> Result<ModuleRecord, AdminError> {
        // Compile without holding the lock: a compile takes tens of ms and
        // must not stall the breaker or a rollback.
        let runtime = {
            let state = self.state.lock().await;
            state.registry.check_new(&name, &version)?;
            state.registry.runtime().clone()
        };
        let (bytes, module, options) = tokio::task::spawn_blocking(move || {
            Registry::compile(&runtime, &bytes, &options).map(|m| (bytes, m, options))
        })
        .await
        .map_err(|e| AdminError::Storage(format!("compile task failed: {e}")))??;
        let mut state = self.state.lock().await;
        state
            .registry
            .insert(&bytes, module, &name, &version, options)
    }

    /// Every module with its state and figures.
    pub async fn list(&self) -> Vec<ModuleView> {
        let stats = self.control.stats().await.unwrap_or_default();
        let state = self.state.lock().await;
        state
            .registry
            .records()
            .map(|record| {
                let id = &record.id;
                let shards: Vec<u32> = (0..state.shards.len() as u32)
                    .filter(|&i| state.shards[i as usize] == *id)
                    .collect();
                let mine = stats.iter().filter(|s| s.module == *id);
                let (memory, peak, series) = mine.fold((0, 0, 0), |(m, p, l), s| {
                    (
                        m + s.module_stats.memory_bytes,
                        p.max(s.module_stats.memory_peak_bytes),
                        l + s.module_stats.live_series,
                    )
                });
                let role = if *id == state.rollout.incumbent {
                    ModuleState::Incumbent
                } else if state.rollout.candidate.as_deref() == Some(id) {
                    ModuleState::Candidate
                } else if state.shadow.as_ref().is_some_and(|(m, _)| m == id) {
                    ModuleState::Shadow
                } else if record.rolled_back.is_some() {
                    ModuleState::RolledBack
                } else {
                    ModuleState::Idle
                };
                ModuleView {
                    record: record.clone(),
                    state: role,
                    shards,
                    memory_bytes: memory,
                    memory_peak_bytes: peak,
                    live_series: series,
                    failures: state.failures.get(id).cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Removes an idle module.
    ///
    /// # Errors
    ///
    /// [`AdminError::Conflict`] if it is the incumbent or the candidate or
    /// runs on a shard; see also [`Registry::remove`].
    pub async fn remove(&self, key: &str) -> Result<ModuleRecord, AdminError> {
        let mut state = self.state.lock().await;
        let id = resolve(&state.registry, key)?.id.clone();
        if id == state.rollout.incumbent
            || state.rollout.candidate.as_deref() == Some(id.as_str())
            || state.shards.contains(&id)
            || state.shadow.as_ref().is_some_and(|(m, _)| *m == id)
        {
            return Err(AdminError::Conflict(
                "the module is in use; roll it back or promote another first".into(),
            ));
        }
        state.registry.remove(&id)
    }

    /// The rollout now.
    pub async fn rollout(&self) -> RolloutView {
        let state = self.state.lock().await;
        view(&state)
    }

    /// Sets the candidate and its share of shards (0–100 %), swapping the
    /// shards that change. A weight of 0 keeps the candidate registered for
    /// the rollout but on no shard.
    ///
    /// # Errors
    ///
    /// [`AdminError::BadRequest`] for a weight over 100 or the incumbent as
    /// candidate, [`AdminError::NotFound`], or [`AdminError::SwapFailed`]:
    /// the candidate failed to take over a shard, the rollout was undone and
    /// the candidate marked rolled back.
    pub async fn set_rollout(
        &self,
        candidate: &str,
        weight: u8,
    ) -> Result<RolloutView, AdminError> {
        if weight > 100 {
            return Err(AdminError::BadRequest(format!(
                "weight {weight} is over 100"
            )));
        }
        let mut state = self.state.lock().await;
        let id = resolve(&state.registry, candidate)?.id.clone();
        if id == state.rollout.incumbent {
            return Err(AdminError::BadRequest(
                "the candidate is the incumbent".into(),
            ));
        }
        if let Some(old) = state.rollout.candidate.clone()
            && old != id
        {
            // A new candidate replaces the old one everywhere first.
            self.retreat(&mut state, &old).await?;
        }
        state.rollout.candidate = Some(id.clone());
        state.rollout.weight = weight;
        state.registry.set_rolled_back(&id, None)?;
        state.candidate_failures.clear();
        if let Err(e) = self.apply(&mut state).await {
            let reason = format!("failed to take over a shard: {e}");
            self.roll_back_locked(&mut state, "swap_failed", &reason)
                .await?;
            return Err(AdminError::SwapFailed(reason));
        }
        self.save(&state)?;
        Ok(view(&state))
    }

    /// Flushes every open bucket of the running pipeline; returns the
    /// flushed watermark.
    ///
    /// # Errors
    ///
    /// [`AdminError::NotRunning`].
    pub async fn flush_open(&self) -> Result<u64, AdminError> {
        self.control
            .flush_open()
            .await
            .map_err(|_| AdminError::NotRunning)
    }

    /// Makes the candidate the incumbent on every shard.
    ///
    /// # Errors
    ///
    /// [`AdminError::Conflict`] without a candidate; [`AdminError::SwapFailed`]
    /// as for [`set_rollout`](Self::set_rollout).
    pub async fn promote(&self) -> Result<RolloutView, AdminError> {
        let mut state = self.state.lock().await;
        let Some(candidate) = state.rollout.candidate.clone() else {
            return Err(AdminError::Conflict(
                "there is no candidate to promote".into(),
            ));
        };
        state.rollout.weight = 100;
        if let Err(e) = self.apply(&mut state).await {
            let reason = format!("failed to take over a shard: {e}");
            self.roll_back_locked(&mut state, "swap_failed", &reason)
                .await?;
            return Err(AdminError::SwapFailed(reason));
        }
        state.rollout = Rollout {
            incumbent: candidate,
            candidate: None,
            weight: 0,
        };
        // The same shards, now with the new incumbent's fallback.
        self.apply(&mut state)
            .await
            .map_err(|e| AdminError::SwapFailed(e.to_string()))?;
        self.save(&state)?;
        tracing::info!(incumbent = %state.rollout.incumbent, "Candidate promoted to incumbent.");
        Ok(view(&state))
    }

    /// Moves the candidate's shards back to the incumbent and marks it
    /// rolled back with `reason`.
    ///
    /// # Errors
    ///
    /// [`AdminError::Conflict`] without a candidate.
    pub async fn rollback(&self, reason: &str) -> Result<RolloutView, AdminError> {
        let mut state = self.state.lock().await;
        if state.rollout.candidate.is_none() {
            return Err(AdminError::Conflict(
                "there is no candidate to roll back".into(),
            ));
        }
        self.roll_back_locked(&mut state, "manual", reason).await?;
        Ok(view(&state))
    }

    /// Runs `candidate` in shadow beside the incumbent on `shards`, or on
    /// `share` percent of the shards that run the incumbent (counted from the
    /// last shard, away from a candidate's share). A shadow already running
    /// is replaced.
    ///
    /// # Errors
    ///
    /// [`AdminError::BadRequest`] for no or unknown shards or the incumbent
    /// as shadow, [`AdminError::NotFound`], [`AdminError::SwapFailed`] if the
    /// shadow cannot start (those that started are stopped again).
    pub async fn start_shadow(
        &self,
        candidate: &str,
        shards: Option<Vec<u32>>,
        share: Option<u8>,
    ) -> Result<Vec<u32>, AdminError> {
        let mut state = self.state.lock().await;
        let id = resolve(&state.registry, candidate)?.id.clone();
        if id == state.rollout.incumbent {
            return Err(AdminError::BadRequest(
                "the incumbent cannot shadow itself; upload a copy to compare a module with itself"
                    .into(),
            ));
        }
        let n = state.shards.len() as u32;
        let on_incumbent: Vec<u32> = (0..n)
            .rev()
            .filter(|&i| state.shards[i as usize] == state.rollout.incumbent)
            .collect();
        let shards = match (shards, share) {
            (Some(list), _) => {
                if let Some(bad) = list.iter().find(|&&i| i >= n) {
                    return Err(AdminError::BadRequest(format!(
                        "no shard {bad} (there are {n})"
                    )));
                }
                list
            }
            (None, Some(share)) if share <= 100 => {
                let k = ((u32::from(share) * n).div_ceil(100)) as usize;
                on_incumbent.into_iter().take(k).collect()
            }
            (None, Some(share)) => {
                return Err(AdminError::BadRequest(format!("share {share} is over 100")));
            }
            (None, None) => on_incumbent,
        };
        if shards.is_empty() {
            return Err(AdminError::BadRequest("no shard to shadow".into()));
        }
        self.stop_shadow_locked(&mut state).await?;
        let to = state
            .registry
            .assignment(&id)
            .ok_or_else(|| AdminError::NotFound(id.clone()))?;
        for (k, &shard) in shards.iter().enumerate() {
            match self.control.shadow(shard, Some(to.clone())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    for &started in &shards[..k] {
                        let _ = self.control.shadow(started, None).await;
                    }
                    return Err(AdminError::SwapFailed(format!(
                        "shadow on shard {shard}: {e}"
                    )));
                }
                Err(_) => return Err(AdminError::NotRunning),
            }
        }
        tracing::info!(module = %to.label, ?shards, "Shadow started.");
        state.diverged.remove(&id);
        state.shadow = Some((id, shards.clone()));
        Ok(shards)
    }

    /// Stops the shadow (its report goes with it).
    ///
    /// # Errors
    ///
    /// [`AdminError::NotRunning`].
    pub async fn stop_shadow(&self) -> Result<(), AdminError> {
        let mut state = self.state.lock().await;
        self.stop_shadow_locked(&mut state).await
    }

    async fn stop_shadow_locked(&self, state: &mut State) -> Result<(), AdminError> {
        if let Some((_, shards)) = state.shadow.take() {
            for shard in shards {
                self.control
                    .shadow(shard, None)
                    .await
                    .map_err(|_| AdminError::NotRunning)?
                    .ok();
            }
        }
        Ok(())
    }

    /// The A/B report of the running (or last stopped-by-failure) shadow.
    ///
    /// # Errors
    ///
    /// [`AdminError::Conflict`] without a shadow, [`AdminError::NotRunning`].
    pub async fn ab_report(&self) -> Result<super::ab::AbReport, AdminError> {
        if self.state.lock().await.shadow.is_none() {
            return Err(AdminError::Conflict(
                "no shadow is running; start one with PUT /shadow".into(),
            ));
        }
        let reports = self
            .control
            .shadow_reports()
            .await
            .map_err(|_| AdminError::NotRunning)?;
        Ok(super::ab::report(&reports))
    }

    /// Counts a shadow's disagreement; rolls the module back if it is the
    /// candidate and the configured threshold is reached.
    async fn on_divergence(&self, shard: u32, module: &str, rows: u64) {
        let mut state = self.state.lock().await;
        let total = {
            let t = state.diverged.entry(module.to_string()).or_default();
            *t += rows;
            *t
        };
        let Some(threshold) = self.config.rollback_on_divergence else {
            return;
        };
        if state.rollout.candidate.as_deref() != Some(module) || total < threshold {
            return;
        }
        let reason = format!(
            "shadow divergence: {total} rows differed from the incumbent (threshold {threshold}), last on shard {shard}"
        );
        tracing::error!(module, reason = %reason, "Rolling the candidate back.");
        if let Err(e) = self
            .roll_back_locked(&mut state, "divergence", &reason)
            .await
        {
            tracing::error!(error = %e, "Automatic rollback failed; an operator must act.");
        }
    }

    /// Counts a shadow's failure in the module list, as `shadow <kind>`: the
    /// shadow has stopped on that shard and never carried data, so there is
    /// nothing to roll back, but an operator deciding on a rollout needs to
    /// see it.
    async fn on_shadow_failure(&self, shard: u32, module: &str, kind: &str, error: &str) {
        tracing::warn!(shard, module, kind, error, "A shadow module failed.");
        let mut state = self.state.lock().await;
        *state
            .failures
            .entry(module.to_string())
            .or_default()
            .entry(format!("shadow {kind}"))
            .or_default() += 1;
    }

    /// Counts a module failure; rolls the candidate back when the breaker
    /// trips.
    async fn on_failure(&self, shard: u32, module: &str, kind: &str, error: &str, fell_back: bool) {
        let mut state = self.state.lock().await;
        *state
            .failures
            .entry(module.to_string())
            .or_default()
            .entry(kind.to_string())
            .or_default() += 1;
        if fell_back {
            // The shard replaced the failing module by its fallback itself.
            let now_running = if module == state.rollout.incumbent {
                self.fallback.clone()
            } else {
                state.rollout.incumbent.clone()
            };
            if let Some(slot) = state.shards.get_mut(shard as usize) {
                *slot = now_running;
            }
        }
        if state.rollout.candidate.as_deref() != Some(module) {
            return;
        }
        let window = Duration::from_secs(self.config.breaker_window_secs);
        let count = record_failure(&mut state.candidate_failures, Instant::now(), window);
        if count >= self.config.breaker_failures {
            let reason = format!(
                "circuit breaker: {count} failures within {}s, last on shard {shard}: {kind}: {error}",
                self.config.breaker_window_secs
            );
            tracing::error!(module, reason = %reason, "Rolling the candidate back.");
            if let Err(e) = self.roll_back_locked(&mut state, kind, &reason).await {
                tracing::error!(error = %e, "Automatic rollback failed; an operator must act.");
            }
        }
    }

    /// Rolls the candidate back; `code` is the low-cardinality reason for
    /// the metric (a failure kind, `manual`, `swap_failed`).
    async fn roll_back_locked(
        &self,
        state: &mut State,
        code: &str,
        reason: &str,
    ) -> Result<(), AdminError> {
        let Some(candidate) = state.rollout.candidate.take() else {
            return Ok(());
        };
        let label = state
            .registry
            .get(&candidate)
            .map(|r| r.label())
            .unwrap_or_default();
        let shards = state.shards.iter().filter(|s| **s == candidate).count();
        state.rollout.weight = 0;
        state.candidate_failures.clear();
        state
            .registry
            .set_rolled_back(&candidate, Some(reason.to_string()))?;
        let result = self.apply(state).await;
        self.save(state)?;
        tracing::warn!(module = %candidate, reason, "Candidate rolled back.");
        ModuleRolledBack {
            module: &label,
            reason: code,
            shards,
        }
        .emit(&self.metrics);
        result
    }

    /// Moves every shard of `old` candidate back to the incumbent.
    async fn retreat(&self, state: &mut State, _old: &str) -> Result<(), AdminError> {
        state.rollout.candidate = None;
        state.rollout.weight = 0;
        self.apply(state).await
    }

    /// Swaps every shard whose module differs from what the rollout says.
    async fn apply(&self, state: &mut State) -> Result<(), AdminError> {
        let n = state.shards.len();
        let on_candidate = (usize::from(state.rollout.weight) * n + 50) / 100;
        let incumbent = state.rollout.incumbent.clone();
        for shard in 0..n {
            let want = match &state.rollout.candidate {
                Some(c) if shard < on_candidate => c.clone(),
                _ => incumbent.clone(),
            };
            if state.shards[shard] == want {
                continue;
            }
            // A candidate falls back to the incumbent, the incumbent to the
            // built-in hashmap.
            let fallback_id = if want == incumbent {
                &self.fallback
            } else {
                &incumbent
            };
            let to = state
                .registry
                .assignment(&want)
                .ok_or_else(|| AdminError::NotFound(want.clone()))?;
            let fallback = state
                .registry
                .assignment(fallback_id)
                .ok_or_else(|| AdminError::NotFound(fallback_id.clone()))?;
            match self.control.swap(shard as u32, to, fallback).await {
                Ok(Ok(_)) => state.shards[shard] = want,
                Ok(Err(e)) => return Err(AdminError::SwapFailed(format!("shard {shard}: {e}"))),
                Err(_) => return Err(AdminError::NotRunning),
            }
        }
        Ok(())
    }

    /// Shows the rollout on `/metrics`.
    fn publish(&self, state: &State) {
        let label = |id: &str| {
            state
                .registry
                .get(id)
                .map(|r| r.label())
                .unwrap_or_default()
        };
        let candidate = state.rollout.candidate.as_deref().map(label);
        self.metrics.set_rollout(
            state.rollout.weight,
            candidate.as_deref(),
            &label(&state.rollout.incumbent),
        );
    }

    fn save(&self, state: &State) -> Result<(), AdminError> {
        self.publish(state);
        let bytes = serde_json::to_vec_pretty(&state.rollout)
            .map_err(|e| AdminError::Storage(e.to_string()))?;
        write_atomic(&self.path, &bytes)
            .map_err(|e| AdminError::Storage(format!("{}: {e}", self.path.display())))
    }
}

/// Adds a failure at `now` and returns how many fell within `window`.
fn record_failure(failures: &mut VecDeque<Instant>, now: Instant, window: Duration) -> u32 {
    failures.push_back(now);
    while failures
        .front()
        .is_some_and(|t| now.duration_since(*t) > window)
    {
        failures.pop_front();
    }
    failures.len() as u32
}

fn resolve<'a>(registry: &'a Registry, key: &str) -> Result<&'a ModuleRecord, AdminError> {
    registry
        .resolve(key)
        .ok_or_else(|| AdminError::NotFound(key.to_string()))
}

fn view(state: &State) -> RolloutView {
    let r = |id: &str| ModuleRef {
        id: id.to_string(),
        label: state
            .registry
            .get(id)
            .map(|r| r.label())
            .unwrap_or_default(),
    };
    RolloutView {
        incumbent: r(&state.rollout.incumbent),
        candidate: state.rollout.candidate.as_deref().map(r),
        weight: state.rollout.weight,
        shards: state.shards.clone(),
    }
}

/// Feeds shard events to the controller until it is dropped.
async fn breaker(
    controller: std::sync::Weak<Controller>,
    mut events: broadcast::Receiver<ShardEvent>,
) {
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "The circuit breaker missed shard events.");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(controller) = controller.upgrade() else {
            return;
        };
        match event {
            ShardEvent::ModuleFailed {
                shard,
                module,
                kind,
                error,
                fell_back,
            } => {
                controller
                    .on_failure(shard, &module, kind, &error, fell_back)
                    .await;
            }
            ShardEvent::ShadowDiverged {
                shard,
                module,
                rows,
            } => controller.on_divergence(shard, &module, rows).await,
            ShardEvent::ShadowFailed {
                shard,
                module,
                kind,
                error,
            } => {
                controller
                    .on_shadow_failure(shard, &module, kind, &error)
                    .await
            }
            ShardEvent::Swapped { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_counts_failures_within_its_window_only() {
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut f = VecDeque::new();
        assert_eq!(record_failure(&mut f, t0, window), 1);
        assert_eq!(
            record_failure(&mut f, t0 + Duration::from_secs(30), window),
            2
        );
        // The first one is now out of the window.
        assert_eq!(
            record_failure(&mut f, t0 + Duration::from_secs(61), window),
            2
        );
        assert_eq!(
            record_failure(&mut f, t0 + Duration::from_secs(200), window),
            1
        );
    }
}
