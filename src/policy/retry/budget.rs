//! Why a budget and not only `max_attempts`? With three attempts per request, a service that fails
//! completely receives three times its normal load exactly when it is least able to take it. A budget caps
//! retries at a share of recent requests (`ratio`, 0.2 = at most 1.2× load) plus a small floor per second,
//! so a sick service sees its normal load and little more.

use std::sync::{Arc, Mutex};

use tower::retry::budget::{Budget as _, TpsBudget};

use crate::policy::config::Budget;

/// The budget of one destination, rebuilt when the policy's budget settings change.
#[derive(Default)]
pub struct BudgetSlot {
    current: Mutex<Option<(Budget, Arc<TpsBudget>)>>,
}

impl std::fmt::Debug for BudgetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BudgetSlot").finish_non_exhaustive()
    }
}

impl BudgetSlot {
    /// The budget for these settings. The settings were validated with the policy file (window 1s..=60s,
    /// ratio 0..=1), which keeps `TpsBudget::new` from panicking; they are clamped here once more so a policy
    /// built in code cannot either.
    pub fn get(&self, settings: &Budget) -> Arc<TpsBudget> {
        let mut current = crate::policy::lock(&self.current);
        if let Some((have, budget)) = current.as_ref() {
            if have == settings {
                return budget.clone();
            }
        }
        let window = settings.window.clamp(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(60),
        );
        let ratio = if settings.ratio.is_finite() {
            settings.ratio.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let min_per_second = settings.min_per_second.min(i32::MAX as u32 - 1);
        let budget = Arc::new(TpsBudget::new(window, min_per_second, ratio));
        *current = Some((settings.clone(), budget.clone()));
        budget
    }
}

/// Records a request (earns retry credit).
pub fn deposit(budget: &TpsBudget) {
    budget.deposit()
}

/// Spends credit for one retry; false when the budget is exhausted.
pub fn withdraw(budget: &TpsBudget) -> bool {
    budget.withdraw()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_plus_the_floor() {
        let slot = BudgetSlot::default();
        let settings = Budget {
            ratio: 0.2,
            min_per_second: 1,
            window: Duration::from_secs(10),
        };
        let budget = slot.get(&settings);
        for _ in 0..100 {
            deposit(&budget);
        }
        let mut retries = 0;
        while withdraw(&budget) {
            retries += 1;
        }
        // 20% of 100 requests plus a floor of 1/s over the 10 s window.
        assert!((20..=30).contains(&retries), "{retries}");
        assert!(
            Arc::ptr_eq(&budget, &slot.get(&settings)),
            "same settings, same budget"
        );
        let changed = Budget {
            ratio: 0.5,
            ..settings
        };
        assert!(!Arc::ptr_eq(&budget, &slot.get(&changed)));
    }

    #[test]
    fn out_of_range_settings_do_not_panic() {
        let slot = BudgetSlot::default();
        slot.get(&Budget {
            ratio: f32::NAN,
            min_per_second: u32::MAX,
            window: Duration::ZERO,
        });
    }
}
