//! Retention schedules: which generations `prune` keeps.
//!
//! The semantics are those of Proxmox Backup Server and benji: the options are applied in
//! the order last, hourly, daily, weekly, monthly, yearly; for each, the newest generation of
//! each period counts, going back from the newest until N periods are kept; periods without
//! a generation do not count, and a period already covered by a generation an earlier option
//! kept is skipped. Periods are UTC calendar hours, days, ISO weeks, months and years.
//! Protected generations and the newest generation are always kept. With no option given,
//! everything is kept.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How many of each period to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Keep the newest N generations, whatever their times (`keep-last`); `None` means the option
    /// is not given.
    #[serde(default)]
    pub keep_last: Option<u32>,
    /// Keep the newest generation of each of the newest N UTC calendar hours that have one.
    #[serde(default)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest generation of each of the newest N UTC calendar days that have one.
    #[serde(default)]
    pub keep_daily: Option<u32>,
    /// Keep the newest generation of each of the newest N ISO weeks (UTC) that have one.
    #[serde(default)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest generation of each of the newest N UTC calendar months that have one.
    #[serde(default)]
    pub keep_monthly: Option<u32>,
    /// Keep the newest generation of each of the newest N UTC calendar years that have one.
    #[serde(default)]
    pub keep_yearly: Option<u32>,
}

impl Schedule {
    /// Whether no option is given (`Some(0)` counts as given); an empty schedule keeps everything.
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(n, _)| n.is_none())
    }

    /// Options set in `over` replace those of `self`.
    pub fn overridden_by(&self, over: &Schedule) -> Schedule {
        Schedule {
            keep_last: over.keep_last.or(self.keep_last),
            keep_hourly: over.keep_hourly.or(self.keep_hourly),
            keep_daily: over.keep_daily.or(self.keep_daily),
            keep_weekly: over.keep_weekly.or(self.keep_weekly),
            keep_monthly: over.keep_monthly.or(self.keep_monthly),
            keep_yearly: over.keep_yearly.or(self.keep_yearly),
        }
    }

    fn rules(&self) -> [(Option<u32>, Period); 6] {
        [
            (self.keep_last, Period::Each),
            (self.keep_hourly, Period::Hour),
            (self.keep_daily, Period::Day),
            (self.keep_weekly, Period::Week),
            (self.keep_monthly, Period::Month),
            (self.keep_yearly, Period::Year),
        ]
    }
}

/// A retention period: the unit in which one `keep_*` option counts generations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// Every generation is its own period (`keep_last`).
    Each,
    /// A UTC calendar hour (`keep_hourly`).
    Hour,
    /// A UTC calendar day (`keep_daily`).
    Day,
    /// An ISO 8601 week, Monday to Sunday UTC, numbered in its ISO week-year (`keep_weekly`).
    Week,
    /// A UTC calendar month (`keep_monthly`).
    Month,
    /// A UTC calendar year (`keep_yearly`).
    Year,
}

/// The period a time falls in, as a comparable key.
pub fn period_key(t: OffsetDateTime, p: Period, index: usize) -> (i32, u32, u32) {
    let t = t.to_offset(time::UtcOffset::UTC);
    match p {
        Period::Each => (0, index as u32, 0),
        Period::Hour => (t.year(), t.ordinal() as u32, t.hour() as u32),
        Period::Day => (t.year(), t.ordinal() as u32, 0),
        Period::Week => {
            let (y, w, _) = t.to_iso_week_date();
            (y, w as u32, 0)
        }
        Period::Month => (t.year(), t.month() as u32, 0),
        Period::Year => (t.year(), 0, 0),
    }
}

/// One generation as retention sees it.
#[derive(Debug, Clone)]
pub struct Item {
    /// When the generation was made; converted to UTC to find its periods.
    pub time: OffsetDateTime,
    /// A protected generation is kept whatever the schedule says.
    pub protected: bool,
}

/// Which of `items` (oldest first) to keep.
pub fn keep(items: &[Item], schedule: &Schedule) -> Vec<bool> {
    let n = items.len();
    let mut kept = vec![false; n];
    if schedule.is_empty() {
        return vec![true; n];
    }
    for (count, period) in schedule.rules() {
        let Some(count) = count else { continue };
        let key = |i: usize| period_key(items[i].time, period, i);
        let covered: std::collections::HashSet<_> = (0..n).filter(|&i| kept[i]).map(key).collect();
        let mut chosen = std::collections::HashSet::new();
        // Newest first: the first generation seen in a period is that period's newest.
        for i in (0..n).rev() {
            if chosen.len() >= count as usize {
                break;
            }
            let k = key(i);
            if kept[i] || covered.contains(&k) || chosen.contains(&k) {
                continue;
            }
            chosen.insert(k);
            kept[i] = true;
        }
    }
    for (i, item) in items.iter().enumerate() {
        kept[i] |= item.protected;
    }
    if let Some(last) = kept.last_mut() {
        *last = true;
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A deliberately different formulation: group into periods first, then walk the
    /// periods from the newest.
    fn reference(items: &[Item], s: &Schedule) -> Vec<bool> {
        let n = items.len();
        if s.is_empty() {
            return vec![true; n];
        }
        let mut kept = vec![false; n];
        for (count, period) in s.rules() {
            let Some(count) = count else { continue };
            let mut newest_in: BTreeMap<(i32, u32, u32), usize> = BTreeMap::new();
            for i in 0..n {
                let k = period_key(items[i].time, period, i);
                let e = newest_in.entry(k).or_insert(i);
                if items[i].time >= items[*e].time {
                    *e = i;
                }
            }
            let covered: Vec<_> = newest_in
                .iter()
                .filter(|(k, _)| {
                    (0..n).any(|j| kept[j] && period_key(items[j].time, period, j) == **k)
                })
                .map(|(k, _)| *k)
                .collect();
            let mut left = count as usize;
            for (k, &i) in newest_in.iter().rev() {
                if left == 0 {
                    break;
                }
                if covered.contains(k) {
                    continue;
                }
                kept[i] = true;
                left -= 1;
            }
        }
        for i in 0..n {
            kept[i] |= items[i].protected;
        }
        if n > 0 {
            kept[n - 1] = true;
        }
        kept
    }

    fn calendar(steps: &[(u32, bool)]) -> Vec<Item> {
        let mut t = time::macros::datetime!(2026-01-01 00:00 UTC);
        steps
            .iter()
            .map(|&(gap_minutes, protected)| {
                t += time::Duration::minutes(gap_minutes as i64 + 1);
                Item { time: t, protected }
            })
            .collect()
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        // Every 8 hours from 08:00 on 1 January: 08:00, 16:00, then 00:00 the next day.
        // The newest three days are 11 January (item 29 alone at 00:00), 10 January
        // (26, 27, 28) and 9 January (23, 24, 25).
        let items = calendar(&[(479, false); 30]);
        let s = Schedule {
            keep_daily: Some(3),
            ..Default::default()
        };
        let kept = keep(&items, &s);
        let idx: Vec<usize> = (0..30).filter(|&i| kept[i]).collect();
        assert_eq!(idx, vec![25, 28, 29]);
    }

    #[test]
    fn nothing_set_keeps_all() {
        let items = calendar(&[(10, false); 5]);
        assert!(keep(&items, &Schedule::default()).iter().all(|&k| k));
    }

    proptest! {
        #[test]
        fn matches_reference(
            steps in proptest::collection::vec((0u32..60*24*20, proptest::bool::weighted(0.1)), 0..60),
            last in proptest::option::of(0u32..5),
            hourly in proptest::option::of(0u32..5),
            daily in proptest::option::of(0u32..8),
            weekly in proptest::option::of(0u32..5),
            monthly in proptest::option::of(0u32..4),
            yearly in proptest::option::of(0u32..3),
        ) {
            let items = calendar(&steps);
            let s = Schedule { keep_last: last, keep_hourly: hourly, keep_daily: daily, keep_weekly: weekly, keep_monthly: monthly, keep_yearly: yearly };
            prop_assert_eq!(keep(&items, &s), reference(&items, &s));
        }
    }
}
