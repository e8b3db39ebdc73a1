//! Summaries of repeated measurements, and the process's CPU time from `/proc`.
//!
//! One window of a throughput figure on a shared 2-core machine is at the mercy of whatever
//! else runs in it; the bench repeats windows and reports the median with its spread, so a
//! reader can tell a difference from noise.

use std::fmt;

/// Median, quartiles and range of a set of measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of measurements.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// First quartile.
    pub q1: f64,
    /// Median.
    pub median: f64,
    /// Third quartile.
    pub q3: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (NaNs are dropped); `None` when nothing is left.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            min: v[0],
            q1: quantile(&v, 0.25),
            median: quantile(&v, 0.5),
            q3: quantile(&v, 0.75),
            max: v[v.len() - 1],
        })
    }
}

/// Quantile `q` of sorted `v` by linear interpolation between closest ranks (R's type 7,
/// numpy's default), so the median of an even count is the mean of the middle two.
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// `median [min–max]` with the precision given (`{:.0}` for samples/s, `{:.3}` for ratios).
pub struct Spread<'a>(pub &'a Summary, pub usize);

impl fmt::Display for Spread<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, p) = (self.0, self.1);
        write!(f, "{:.p$} [{:.p$}–{:.p$}]", s.median, s.min, s.max)
    }
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat`, and the part of
/// it spent by live threads whose name starts with `prefix` (from `/proc/self/task/*/stat`).
/// The whole-process figure includes threads that have exited (tokio's blocking pool lets idle
/// threads go), the per-thread one only live threads: give the threads to be told apart
/// long-lived names. `None` off Linux or when `/proc` cannot be read.
pub fn cpu_seconds(prefix: &str) -> Option<(f64, f64)> {
    let total = stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?.1;
    let mut named = 0;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        // A thread may exit between the listing and the read: skip it.
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, ticks)) = stat_ticks(&text)
            && comm.starts_with(prefix)
        {
            named += ticks;
        }
    }
    Some((total as f64 / CLOCK_TICKS, named as f64 / CLOCK_TICKS))
}

/// `/proc` reports times in USER_HZ ticks, which Linux fixes at 100 for user space on every
/// architecture (`sysconf(_SC_CLK_TCK)` would need `unsafe` FFI, which this crate forbids).
const CLOCK_TICKS: f64 = 100.0;

/// The command name and utime + stime (fields 14 and 15) of a `/proc/.../stat` line. The name
/// is in parentheses and may itself hold spaces or parentheses, so fields are counted from the
/// last `)`.
fn stat_ticks(line: &str) -> Option<(&str, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?;
    // After ")": field 3 (state) is the first; utime and stime are fields 14 and 15.
    let mut rest = line.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((comm, utime + stime))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summary_quantiles_interpolate_like_numpy() {
        // numpy.percentile([3, 1, 4, 1, 5], [0, 25, 50, 75, 100]) = [1, 1, 3, 4, 5].
        let s = Summary::of(&[3.0, 1.0, 4.0, 1.0, 5.0]).unwrap();
        assert_eq!(
            (s.min, s.q1, s.median, s.q3, s.max),
            (1.0, 1.0, 3.0, 4.0, 5.0)
        );
        // numpy.percentile([1, 2, 3, 4], [25, 50, 75]) = [1.75, 2.5, 3.25].
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.q1, s.median, s.q3), (1.75, 2.5, 3.25));
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(format!("{}", Spread(&s, 1)), "2.5 [1.0–4.0]");
    }

    #[test]
    fn stat_lines_are_read_from_the_last_parenthesis() {
        // A name with a space and a parenthesis; utime 7, stime 5 (fields 14 and 15).
        let line = "42 (sim (worker) x) S 1 2 3 4 5 6 7 8 9 10 7 5 0 0 20 0 1 0 100";
        assert_eq!(stat_ticks(line), Some(("sim (worker) x", 12)));
        assert_eq!(stat_ticks("42 (x) S 1"), None);
        if cfg!(target_os = "linux") {
            let (total, named) = cpu_seconds("no-such-thread-name").unwrap();
            assert!(total >= 0.0 && named == 0.0);
        }
    }
}
