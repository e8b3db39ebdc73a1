//! Deadlines for every wait of a test: a hang fails the test, naming what it waited for,
//! instead of blocking the suite (and CI) for good.

use std::future::{Future, IntoFuture};
use std::time::{Duration, Instant};

/// The longest any one awaited call may take under [`Deadline::deadline`].
pub const AWAIT_LIMIT: Duration = Duration::from_secs(60);

/// `test` within `limit`, or a panic naming `what`.
pub async fn within<T>(limit: Duration, what: &str, test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, test).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not finished within {limit:?}"),
    }
}

/// [`within`] from synchronous code, on a throwaway current-thread runtime.
pub fn block_within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        // The timer is created inside the runtime (it needs its time driver).
        .block_on(async { tokio::time::timeout(limit, f).await })
        .unwrap_or_else(|_| panic!("{what}: not finished within {limit:?}"))
}

/// `.deadline().await` instead of `.await`: the awaited value, or a panic naming the line that
/// waited after [`AWAIT_LIMIT`].
pub trait Deadline: IntoFuture + Sized {
    #[track_caller]
    fn deadline(self) -> impl Future<Output = Self::Output> {
        let at = std::panic::Location::caller();
        let f = self.into_future();
        async move {
            match tokio::time::timeout(AWAIT_LIMIT, f).await {
                Ok(v) => v,
                Err(_) => panic!("{at}: the awaited call did not finish within {AWAIT_LIMIT:?}"),
            }
        }
    }
}

impl<F: IntoFuture> Deadline for F {}

/// Waits until `cond` holds, checking it every millisecond; panics naming `what` and the
/// caller's line after `limit`. (For a condition on state of this process that nothing
/// signals.) The check parks the worker between tries rather than spinning on `yield_now`:
/// a spinning task can keep a task woken on its worker (tokio's LIFO slot, which no other
/// worker steals) from ever running, and the condition it waits for with it.
#[track_caller]
pub fn until(limit: Duration, what: &str, cond: impl Fn() -> bool) -> impl Future<Output = ()> {
    let at = std::panic::Location::caller();
    let what = what.to_string();
    async move {
        let poll = async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        if tokio::time::timeout(limit, poll).await.is_err() {
            panic!("{at}: {what}: not within {limit:?}");
        }
    }
}

/// Polls `cond` until it gives a value; panics at the deadline. (For a condition on another
/// process's state: there is nothing else to wait on.)
pub fn wait_until<T>(limit: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not reached within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
