//! Learning-rate schedules, as functions of (optimizer step, epoch):
//! - `step`:   llama-recipes' `StepLR(step_size=1, gamma)` stepped once per epoch: lr * gamma^epoch.
//! - `cosine`: transformers' `get_cosine_with_min_lr_schedule_with_warmup`: linear warmup from 0 over
//!   `warmup_steps`, then half a cosine from lr down to lr * min_lr_ratio at `total_steps`.
//! - `linear`: transformers' `get_linear_schedule_with_warmup` (the HF Trainer's default): the same
//!   warmup, then a straight line from lr down to lr * min_lr_ratio (0: transformers') at
//!   `total_steps`.
//! - `constant`: transformers' `get_constant_schedule_with_warmup`: the warmup, then lr.
use crate::config::{Schedule, ScheduleKind};

#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub schedule: Schedule,
    /// Optimizer steps of the whole run (cosine's horizon).
    pub total_steps: u64,
}

impl LrSchedule {
    /// As checkpoints record it (`manifest.json` "scheduler").
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "base_lr": self.base_lr,
            "total_steps": self.total_steps,
            "schedule": serde_json::to_value(&self.schedule).unwrap_or(serde_json::Value::Null),
        })
    }

    /// A recorded schedule (`to_json`, as in a checkpoint) reduced to what its kind uses: step
    /// ignores the run's length, warmup and floor; constant the length, floor and gamma; cosine
    /// and linear ignore gamma. Two schedules with equal reductions give the same learning rate
    /// at every step.
    pub fn used_fields(recorded: &serde_json::Value) -> serde_json::Value {
        let mut v = recorded.clone();
        let kind = v["schedule"]["kind"].as_str().unwrap_or("").to_string();
        if kind == "step" || kind == "constant" {
            if let Some(o) = v.as_object_mut() {
                o.remove("total_steps");
            }
        }
        if let Some(o) = v["schedule"].as_object_mut() {
            let unused: &[&str] = match kind.as_str() {
                "step" => &["warmup_steps", "min_lr_ratio"],
                "constant" => &["gamma", "min_lr_ratio"],
                _ => &["gamma"],
            };
            for k in unused {
                o.remove(*k);
            }
        }
        v
    }

    pub fn new(base_lr: f64, schedule: &Schedule, total_steps: u64) -> Self {
        Self {
            base_lr,
            schedule: schedule.clone(),
            total_steps,
        }
    }

    /// A warning when the warmup outlasts the run (its last step's lr is below `base_lr`, which
    /// it never reaches); transformers says nothing, but a run that knows its length can.
    pub fn warmup_note(&self) -> Option<String> {
        let w = self.schedule.warmup_steps;
        if self.schedule.kind == ScheduleKind::Step || w < self.total_steps.max(1) {
            return None;
        }
        let last = self.lr(self.total_steps.saturating_sub(1), 0);
        Some(format!(
            "train.schedule.warmup_steps ({w}) is not shorter than the run ({} optimizer steps): \
             the learning rate rises to {last:.3e} at the last step and never reaches train.lr \
             ({:.3e}); lower warmup_steps",
            self.total_steps, self.base_lr
        ))
    }

    /// The lr of optimizer step `step` (0-based, counted over the whole run) in epoch `epoch` (0-based).
    pub fn lr(&self, step: u64, epoch: u64) -> f64 {
        let s = &self.schedule;
        match s.kind {
            ScheduleKind::Step => self.base_lr * s.gamma.powi(epoch as i32),
            ScheduleKind::Cosine | ScheduleKind::Linear | ScheduleKind::Constant => {
                let w = s.warmup_steps;
                if step < w {
                    return self.base_lr * step as f64 / w.max(1) as f64;
                }
                let progress =
                    (step - w) as f64 / (self.total_steps.saturating_sub(w)).max(1) as f64;
                // the fraction of the way from lr to the floor still to go
                let left = match s.kind {
                    ScheduleKind::Cosine => {
                        0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
                    }
                    ScheduleKind::Linear => 1.0 - progress.min(1.0),
                    _ => 1.0,
                };
                self.base_lr * (left * (1.0 - s.min_lr_ratio) + s.min_lr_ratio)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind) -> Schedule {
        Schedule {
            kind,
            gamma: 0.85,
            warmup_steps: 2,
            min_lr_ratio: 0.1,
        }
    }

    #[test]
    fn step_lr_per_epoch() {
        let s = LrSchedule::new(1e-5, &sched(ScheduleKind::Step), 100);
        assert_eq!(s.lr(0, 0), 1e-5);
        assert_eq!(s.lr(57, 0), 1e-5);
        assert!((s.lr(3, 2) - 1e-5 * 0.85 * 0.85).abs() < 1e-20);
    }

    /// A warmup as long as the run or longer is warned about (the lr never reaches its value);
    /// one step shorter, or a step schedule (no warmup), is not.
    #[test]
    fn a_warmup_that_outlasts_the_run_is_warned_about() {
        let mut c = sched(ScheduleKind::Cosine);
        c.warmup_steps = 50;
        let note = LrSchedule::new(1e-3, &c, 3).warmup_note().unwrap();
        assert!(
            note.contains("warmup_steps (50) is not shorter than the run (3 optimizer steps)")
                && note.contains("rises to 4.000e-5 at the last step")
                && note.contains("train.lr (1.000e-3)"),
            "{note}"
        );
        assert!(LrSchedule::new(1e-3, &c, 50).warmup_note().is_some());
        assert_eq!(LrSchedule::new(1e-3, &c, 51).warmup_note(), None);
        c.kind = ScheduleKind::Step;
        assert_eq!(LrSchedule::new(1e-3, &c, 3).warmup_note(), None);
    }

    #[test]
    fn linear_and_constant_with_warmup() {
        let s = LrSchedule::new(1.0, &sched(ScheduleKind::Linear), 10);
        assert_eq!((s.lr(0, 0), s.lr(1, 0), s.lr(2, 0)), (0.0, 0.5, 1.0));
        // a quarter of the decay: 0.75 * (1 - 0.1) + 0.1
        assert!((s.lr(4, 0) - 0.775).abs() < 1e-12);
        assert!((s.lr(10, 0) - 0.1).abs() < 1e-12);
        assert!((s.lr(30, 0) - 0.1).abs() < 1e-12);
        let mut c = sched(ScheduleKind::Constant);
        c.min_lr_ratio = 0.0;
        let s = LrSchedule::new(2.0, &c, 10);
        assert_eq!(
            (s.lr(0, 0), s.lr(1, 0), s.lr(2, 0), s.lr(9, 3)),
            (0.0, 1.0, 2.0, 2.0)
        );
        // transformers' linear: to 0 at the end (min_lr_ratio 0)
        c.kind = ScheduleKind::Linear;
        let s = LrSchedule::new(2.0, &c, 10);
        assert_eq!((s.lr(6, 0), s.lr(10, 0)), (1.0, 0.0));
    }

    #[test]
    fn constant_ignores_the_runs_length_and_gamma() {
        let a = LrSchedule::new(1.0, &sched(ScheduleKind::Constant), 10).to_json();
        let mut other = sched(ScheduleKind::Constant);
        other.gamma = 0.5;
        let b = LrSchedule::new(1.0, &other, 99).to_json();
        assert_eq!(LrSchedule::used_fields(&a), LrSchedule::used_fields(&b));
        let lin = |n| LrSchedule::new(1.0, &sched(ScheduleKind::Linear), n).to_json();
        assert_ne!(
            LrSchedule::used_fields(&lin(10)),
            LrSchedule::used_fields(&lin(99))
        );
    }

    #[test]
    fn cosine_with_warmup_and_floor() {
        let s = LrSchedule::new(1.0, &sched(ScheduleKind::Cosine), 10);
        assert_eq!(s.lr(0, 0), 0.0);
        assert_eq!(s.lr(1, 0), 0.5);
        assert_eq!(s.lr(2, 0), 1.0);
        // halfway through the decay: 0.5 * (1 - 0.1) + 0.1
        assert!((s.lr(6, 0) - 0.55).abs() < 1e-12);
        assert!((s.lr(10, 0) - 0.1).abs() < 1e-12);
        assert!((s.lr(20, 0) - 0.1).abs() < 1e-12);
    }
}
